"""onebox-ingest: inbox folders to the retrieval index (index.db), off the request path.

watch.py (which files are complete, which are gone) -> queue.py (the durable job queue)
-> pipeline.py (parse.py or the OCR daemon -> cache.py -> chunk.py with tokens.py ->
the embedding daemon -> daemons/index/write.py), driven by engine.py, started by main.py.
"""

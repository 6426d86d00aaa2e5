"""index.db, the retrieval index: its schema (schema.py), its one writer (write.py, used
by the ingestion daemon) and its readers (search.py: the router, the commands)."""

"""Embedding models: converting sentence-transformers BERT models to GGUF for llama.cpp."""

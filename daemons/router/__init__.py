"""onebox-router: OpenAI-compatible HTTP API and bus broker."""

"""onebox-infer@MODEL: a chat/completion model served over the bus."""

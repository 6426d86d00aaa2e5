"""The router<->daemon bus: ZeroMQ + msgpack, Majordomo-style."""

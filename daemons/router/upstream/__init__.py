"""Upstream providers: OpenAI-compatible servers and Anthropic's Messages API, called
the way a local model is.

A `Provider` (one per [providers.NAME]) owns an HTTP connection pool and a circuit
breaker; `Provider.open()` sends a bus body, with retries, timeouts and the deadline
applied, and returns an `UpstreamCall` that yields the same ("partial", {"text"}) ...
("final", {"finish_reason", "usage"}) pairs as a bus `Call`. Every failure is an
`UpstreamError` whose `code` is the status the router answers.
"""

from daemons.router.upstream.errors import UpstreamError
from daemons.router.upstream.provider import Provider, ProviderSpec, UpstreamCall

__all__ = ["Provider", "ProviderSpec", "UpstreamCall", "UpstreamError"]

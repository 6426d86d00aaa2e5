"""How an upstream call fails, said the way the router answers it.

`code` is the status the router returns (the upstream's own status is in the message);
`retryable_elsewhere` tells a fallback chain whether another model may succeed where
this one failed; `kind` is a short label for metrics. Messages never carry an API key:
the provider redacts upstream text before it gets here.
"""

from __future__ import annotations

from typing import Literal

from daemons.bus.errors import BusError

Kind = Literal["http_5xx", "http_429", "timeout", "deadline", "connect", "circuit_open", "http_4xx", "protocol"]

# An upstream's 401/403 means our key (or its rights) is wrong, not the caller's: the
# caller did nothing a different request could fix, so the router answers 502.
CREDENTIAL_STATUSES = (401, 403)


class UpstreamError(BusError):
    code = 502

    def __init__(self, message: str, code: int, kind: Kind, retryable_elsewhere: bool,
                 retry_after: float | None = None) -> None:
        super().__init__(message, code)
        self.kind: Kind = kind
        self.retryable_elsewhere = retryable_elsewhere
        self.retry_after = retry_after  # seconds, when the upstream (or an open circuit) said

    @property
    def trips_breaker(self) -> bool:
        """Whether the circuit breaker counts it: a 4xx answer shows the provider is up, and
        a request whose own short deadline ran out says nothing about the provider."""
        return self.kind not in ("http_4xx", "deadline")

    def __repr__(self) -> str:
        return f"UpstreamError({self.code}, {self.kind}, {self.message!r})"


def from_status(status: int, reason: str, retry_after: float | None = None) -> UpstreamError:
    """The error for an upstream's HTTP status (or the status an error event names)."""
    if status == 429:
        return UpstreamError(f"rate limited (429): {reason}", 429, "http_429", True, retry_after)
    if status >= 500:
        return UpstreamError(f"answered {status}: {reason}", 502, "http_5xx", True)
    if status == 408:
        return UpstreamError(f"timed out (408): {reason}", 504, "timeout", True)
    if status in CREDENTIAL_STATUSES:
        return UpstreamError(f"refused our credentials ({status}): {reason}", 502, "http_4xx", False)
    if 400 <= status < 500:
        # The request's own fault (bad parameter, prompt too long, unknown model): the
        # caller gets the upstream's status and words.
        return UpstreamError(reason, status, "http_4xx", False)
    return protocol(f"answered an unexpected HTTP {status}")


def protocol(reason: str) -> UpstreamError:
    """The upstream answered something that is not what its API says it answers."""
    return UpstreamError(reason, 502, "protocol", True)


def timeout(reason: str) -> UpstreamError:
    return UpstreamError(reason, 504, "timeout", True)


def deadline(reason: str) -> UpstreamError:
    """The request's own deadline (shorter than timeout_s) passed first: nothing to retry
    elsewhere, and no failure of the provider."""
    return UpstreamError(reason, 504, "deadline", False)


def connect(reason: str) -> UpstreamError:
    return UpstreamError(reason, 503, "connect", True)


def circuit_open(retry_after: float) -> UpstreamError:
    return UpstreamError("circuit open after repeated failures; not calling it for now", 503, "circuit_open", True,
                         retry_after)


def bad_request(reason: str) -> UpstreamError:
    """A request this provider cannot take at all, refused before anything is sent."""
    return UpstreamError(reason, 400, "http_4xx", False)

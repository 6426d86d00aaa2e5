"""Typed errors a bus call can end with; `code` is the HTTP status the router returns."""

from __future__ import annotations


class BusError(Exception):
    code = 500

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NoWorker(BusError):
    """No live worker serves the service."""

    code = 503


class WorkerLost(BusError):
    """The worker handling a request stopped answering heartbeats or went away."""

    code = 503


class DeadlineExceeded(BusError):
    """The request's deadline passed before it finished."""

    code = 504


class RemoteError(BusError):
    """The worker answered ERROR; code and message are the worker's."""


class RequestError(BusError):
    """Raised by a worker's handler to refuse one request (bad input, overload)."""


# The `kind` an ERROR carries to a bus client, so it raises the same type the broker did.
KINDS: dict[str, type[BusError]] = {
    "no_worker": NoWorker, "worker_lost": WorkerLost, "deadline": DeadlineExceeded, "remote": RemoteError,
}


def kind_of(exc: BusError) -> str:
    for kind, cls in KINDS.items():
        if type(exc) is cls:
            return kind
    return "remote"


def from_wire(kind: str | None, message: str, code: int) -> BusError:
    return KINDS.get(kind or "remote", RemoteError)(message, code)

"""The router's section: where the API listens, deadlines, limits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from daemons.config.schema import setting


def _octal_mode(value: str) -> str | None:
    try:
        mode = int(value, 8)
    except ValueError:
        return f"not an octal mode: {value!r}"
    return f"{value!r} is not a file mode" if mode & ~0o777 else None


def _host_port(value: str) -> str | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected HOST:PORT, got {value!r}"
    return None


@dataclass(frozen=True)
class RouterConfig:
    socket_mode: str = setting("0660", "api.sock permissions (octal) and group; clients need write access to connect.",
                               check=_octal_mode)
    socket_group: str = setting("", "")
    tcp: str = setting("", 'Also listen on TCP, e.g. "127.0.0.1:8080"; empty for the Unix socket only.',
                       check=_host_port)
    request_timeout_s: float = setting(
        300.0, "A request's deadline; clients may ask for less or more (up to the max) with the\n"
               "X-Request-Timeout header, in seconds. Past it the answer is 504.", gt=0)
    max_request_timeout_s: float = setting(3600.0, "", gt=0)
    max_body_bytes: int = setting(8 * 1024 * 1024, "Larger request bodies get 413 (with or without Content-Length).",
                                  ge=1024)
    shutdown_timeout_s: float = setting(10.0, "On SIGTERM: stop accepting, let requests finish for this long, then cancel them.",
                                        gt=0)
    retry_after_s: int = setting(5, "Retry-After (seconds) sent with 503 and 429.", ge=0)

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def tcp_host_port(self) -> tuple[str, int] | None:
        if not self.tcp:
            return None
        host, _, port = self.tcp.rpartition(":")
        return host.strip("[]"), int(port)

    def problems(self) -> Iterator[str]:
        if self.request_timeout_s > self.max_request_timeout_s:
            yield "request_timeout_s: must not exceed max_request_timeout_s"

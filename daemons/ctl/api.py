"""The router's API for the `onebox` tools (ingest, search, documents, mcp): an httpx
client over the Unix socket (or TCP with --url), and every failure as one plain line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from daemons import config as config_mod
from daemons.config import Config, ConfigError
from daemons.ctl import up

EX_UNAVAILABLE = 69
EX_CONFIG = 78
PAGE = 1000  # the router's largest page (GET /v1/documents limit)
SECTIONS = ("paths", "collections")


class APIError(Exception):
    """A request that failed, with the one line to show for it. `reachable` is False when
    the router did not answer at all (not running, no permission, timed out)."""

    def __init__(self, message: str, status: int | None = None, reachable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reachable = reachable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG, else /etc/onebox/onebox.toml, "
                                         "else the suite `onebox up` runs from this checkout)")
    parser.add_argument("--url", help="reach the router over TCP (e.g. http://127.0.0.1:8080, see router.tcp) "
                                      "instead of its Unix socket; the API key is read from $ONEBOX_API_KEY")


@dataclass(frozen=True)
class Endpoint:
    """Where the router listens: its Unix socket, or a TCP base URL."""

    socket: Path | None = None
    url: str | None = None

    @classmethod
    def of(cls, config: Config | None, url: str | None) -> Endpoint:
        if url:
            return cls(url=url.rstrip("/"))
        if config is None:
            raise ValueError("either a config or a URL is needed")
        return cls(socket=config.paths.api_socket)

    def __str__(self) -> str:
        return str(self.socket) if self.socket is not None else str(self.url)

    def client(self, timeout: float = 60.0) -> httpx.Client:
        # A key for the router over TCP (on its Unix socket the caller's uid is enough).
        key = os.environ.get("ONEBOX_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if self.socket is not None:
            transport = httpx.HTTPTransport(uds=str(self.socket))
            return httpx.Client(transport=transport, base_url="http://onebox", timeout=timeout, headers=headers)
        return httpx.Client(base_url=str(self.url), timeout=timeout, headers=headers)


def explain(exc: httpx.HTTPError, endpoint: Endpoint) -> APIError:
    """A connection failure as the line a person needs: what, where, the likely cause."""
    text = str(exc)
    if isinstance(exc, httpx.TimeoutException):
        return APIError(f"the router at {endpoint} did not answer in time ({type(exc).__name__})", reachable=False)
    if isinstance(exc, httpx.ConnectError) and "Permission denied" in text:
        return APIError(f"permission denied on {endpoint}: is this user in the onebox group?", reachable=False)
    if isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError)):
        return APIError(f"cannot reach the router at {endpoint}: is onebox-router running?", reachable=False)
    return APIError(f"the router at {endpoint}: {text or type(exc).__name__}", reachable=False)


def error_message(response: httpx.Response) -> str:
    """An error response (OpenAI-style `{"error": {"message": ...}}`) as one line."""
    request = response.request
    what = f"{request.method} {request.url.path}"
    message: str | None = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
        elif body.get("detail"):
            message = str(body["detail"])
    if message is None:
        message = response.text.strip()[:200] or response.reason_phrase
    return f"{what}: {message} (HTTP {response.status_code})"


class API:
    """The router's endpoints the tools use; every failure is an APIError."""

    def __init__(self, endpoint: Endpoint, timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.http = endpoint.client(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise explain(exc, self.endpoint) from None
        if response.status_code >= 400:
            raise APIError(error_message(response), response.status_code)
        return response

    def json(self, method: str, path: str, **kw: Any) -> Any:
        response = self.request(method, path, **kw)
        try:
            return response.json()
        except ValueError:
            raise APIError(f"{method} {path}: the router's answer is not JSON") from None

    def search(self, query: str, collection: str | None = None, k: int | None = None,
               mode: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query}
        for key, value in (("collection", collection), ("k", k), ("mode", mode)):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = self.json("POST", "/v1/search", json=body)
        return result

    def documents_page(self, collection: str | None = None, status: str | None = None, limit: int = PAGE,
                       after: int | None = None) -> dict[str, Any]:
        params: dict[str, str | int] = {"limit": limit}
        for key, value in (("collection", collection), ("status", status), ("after", after)):
            if value is not None:
                params[key] = value
        page: dict[str, Any] = self.json("GET", "/v1/documents", params=params)
        return page

    def documents(self, collection: str | None = None, status: str | None = None,
                  limit: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every document (up to `limit`), paging with after=, and the first page's counts."""
        found: list[dict[str, Any]] = []
        counts: dict[str, Any] = {}
        for page in self._pages(collection, status, limit):
            counts = counts or dict(page.get("counts") or {})
            found.extend(page.get("data") or [])
        return (found if limit is None else found[:limit]), counts

    def _pages(self, collection: str | None, status: str | None, limit: int | None) -> Iterator[dict[str, Any]]:
        after: int | None = None
        seen = 0
        while True:
            size = PAGE if limit is None else max(1, min(PAGE, limit - seen))
            page = self.documents_page(collection, status, size, after)
            yield page
            data = page.get("data") or []
            seen += len(data)
            if not page.get("has_more") or not data or (limit is not None and seen >= limit):
                return
            after = int(data[-1]["id"])

    def document(self, document_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.json("GET", f"/v1/documents/{document_id}")
        return result

    def content(self, document_id: int) -> str:
        response = self.request("GET", f"/v1/documents/{document_id}/content")
        if response.headers.get("content-type", "").startswith("application/json"):
            # The markdown may come wrapped in an object rather than as text/markdown.
            body = response.json()
            if isinstance(body, dict):
                for key in ("markdown", "content", "text"):
                    if isinstance(body.get(key), str):
                        return str(body[key])
        return response.text


def failure(prog: str, exc: ConfigError | APIError) -> int:
    """Print why a command failed, as one line; its exit status: 78 for the config, 69 when
    the router did not answer, 1 when it refused."""
    if isinstance(exc, ConfigError):
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(f"{prog}: {exc.message}", file=sys.stderr)
    return 1 if exc.reachable else EX_UNAVAILABLE


def load_config(path: str | None, sections: tuple[str, ...] = SECTIONS) -> Config:
    """The sections the tools read (sockets and collections); raises ConfigError.
    With no --config, no $ONEBOX_CONFIG and no /etc/onebox/onebox.toml, the suite is the
    one `onebox up` runs from this checkout (its config, ./var/run and ./var/lib)."""
    if path is None and not os.environ.get("ONEBOX_CONFIG") and not config_mod.DEFAULT_CONFIG.exists():
        return config_mod.load(up.default_config(), up.dev_env(dict(os.environ)), sections=sections)
    return config_mod.load(path, sections=sections)


def connect(config_path: str | None, url: str | None, timeout: float = 60.0) -> API:
    """The API at --url, else at the config's socket (a ConfigError when it cannot be read)."""
    config = None if url else load_config(config_path)
    return API(Endpoint.of(config, url), timeout)

"""Schemathesis against the router's own OpenAPI document, over the Unix socket.

The document comes from the running router (GET /openapi.json, daemons/router/openapi.py)
and schemathesis generates requests from it, valid and invalid (its examples, coverage
and fuzzing phases, both generation modes, derandomized: the same cases on every run),
for every operation: chat and text completions, embeddings, OCR, search, documents,
models, status, keys, usage, health, readiness and metrics. Each answer must be no 5xx,
conform to the document (status, media type, body schema), reject what the document
calls invalid, and be an OpenAI error object whenever it is an error, in a streamed
answer's events too. Afterwards every daemon is still running, /ready says 200 and each
service still answers a real request.

The suite is real (router, embedding, OCR and ingestion daemons) but for inference: a
chat worker on the bus skeleton that answers at once (tests/workers/slow_chat_worker.py
with no delay), so thousands of chat cases take seconds. Uploads are bounded by the
config (small files, few pages) rather than left out.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import zmq.asyncio
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from daemons.bus.broker import Broker
from daemons.config import Config
from daemons.router import openapi
from daemons.router.app import create_app
from daemons.router.errors import TYPES
from tests.harness import Suite, write_config
from tests.ocr_docs import PAGES, scan

EMBED_GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
BASE = "http://onebox"
MIN_CASES = 2000  # across all operations, or the run proves little
# Cases per operation and generation mode in the fuzzing phase; the examples and
# coverage phases add their own (boundaries, missing fields, wrong types).
MAX_EXAMPLES = 60
# Chat and text completions are most of the API's surface: more of them.
HEAVY = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/search")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]

CLIENT_ERRORS = {"invalid_request_error", "authentication_error", "permission_error", "rate_limit_error"}

CASES: Counter[str] = Counter()  # by operation
SECONDS: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


def config_text(root: Path) -> str:
    return (f'[embeddings.minilm]\npath = "{EMBED_GGUF}"\nthreads = 1\n'
            "[router]\nrequest_timeout_s = 30\nmax_body_bytes = 1048576\n"
            # Uploads the fuzzer sends stay small, and OCR of one stays short.
            "[ocr]\nworkers = 1\nmax_file_bytes = 262144\nmax_pages = 2\npage_timeout_s = 20\nmax_dpi = 300\n"
            "[ingest]\nsettle_s = 0.5\nmax_file_bytes = 65536\nmax_attempts = 1\n"
            f'[collections.docs]\nfolder = "{root / "inbox" / "docs"}"\n')


@pytest.fixture(scope="module")
def asuite() -> Iterator[Suite]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        root = Path(d)
        suite = Suite(root, write_config(root, extra=config_text(root)))
        try:
            suite.start_documents(infer=False, wait=False)
            suite.start_module("chat", "tests.workers.slow_chat_worker", "smollm2", "--delay", "0", "--slots", "64")
            suite.wait_api_ready(timeout=60)
            yield suite
        finally:
            suite.stop()


@pytest.fixture(scope="module")
def client(asuite: Suite) -> Iterator[httpx.Client]:
    with asuite.client(timeout=60) as c:
        yield c


def app_document() -> dict[str, Any]:
    """The router app's document, built in this process (no I/O: the app is not served).
    test_the_router_serves_this_document checks it is what GET /openapi.json says. Built
    at import because schemathesis parametrizes at collection; its lazy loader
    (`schemathesis.pytest.from_fixture`) does not run under pytest 9.2."""
    ctx = zmq.asyncio.Context()
    try:
        config = Config()
        return openapi.document(create_app(config, Broker("inproc://unused", config.bus, ctx)))
    finally:
        ctx.term()


DOCUMENT = app_document()
# A config of our own (no schemathesis.toml found by chance): derandomized, no example
# database, the same cases on every run.
CONFIG = schemathesis.Config.from_dict({
    "seed": 16,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "checks": {"negative_data_rejection": {"expected-statuses": ["400", "404", "405", "413", "415", "422"]}},
    "operations": [{"include-path": path, "generation": {"max-examples": 3 * MAX_EXAMPLES}} for path in HEAVY],
})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
# POST /v1/ocr takes a PDF as the raw body: sent as the bytes generated for it.
schemathesis.serializer.alias("application/pdf", "application/octet-stream")
# The models this suite serves, by route: a valid request names one of them (the
# document cannot: model names are the box's config), else it stops at a 404.
MODELS = {"/v1/chat/completions": "smollm2", "/v1/completions": "smollm2", "/v1/embeddings": "minilm"}


@schema.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """Valid cases name a served model, but for one in eight (unknown models: 404)."""
    model = MODELS.get(case.path)
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if model and positive and isinstance(case.body, dict) and "model" in case.body \
            and len(repr(case.body)) % 8:
        case.body["model"] = model
    return case


def test_the_router_serves_this_document(client: httpx.Client) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    assert r.json() == json.loads(json.dumps(DOCUMENT))


def send(client: httpx.Client, case: schemathesis.Case) -> httpx.Response:
    """The case as schemathesis would send it (its own serializers: JSON, multipart,
    raw bytes), prepared by requests and sent by httpx over the Unix socket."""
    kwargs = case.as_transport_kwargs(base_url=BASE)
    known = {"method", "url", "headers", "params", "cookies", "json", "data", "files"}
    assert set(kwargs) <= known, f"unexpected transport arguments {set(kwargs) - known}"
    prepared = requests.Request(**kwargs).prepare()
    headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}
    body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
    assert prepared.method is not None and prepared.url is not None
    try:
        return client.request(prepared.method, prepared.url, headers=headers, content=body)
    except httpx.TransportError as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}; the case: {case.as_curl_command()}") from exc


def check_error_body(status: int, body: Any, where: str) -> None:
    """OpenAI's error object, exactly as daemons/router/errors.py makes it."""
    assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: not an OpenAI error object: {body!r}"
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, f"{where}: {body!r}"
    assert isinstance(err["message"], str) and err["message"], f"{where}: {body!r}"
    if status < 500:  # the client's fault, whoever found it (the router or a worker)
        assert err["type"] in CLIENT_ERRORS, f"{where}: {status} with {body!r}"
    assert err["type"] == TYPES.get(status, err["type"]), f"{where}: {status} with {body!r}"
    assert err["param"] is None or isinstance(err["param"], str), f"{where}: {body!r}"
    assert err["code"] is None or isinstance(err["code"], str), f"{where}: {body!r}"


def check_events(text: str, where: str) -> None:
    """A streamed answer: every event JSON (or [DONE]) and none an error."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events, f"{where}: a stream with no events"
    for data in events:
        if data != "[DONE]":
            assert "error" not in json.loads(data), f"{where}: the stream ended with an error: {data}"


@schema.parametrize()
def test_every_answer_conforms(case: schemathesis.Case, client: httpx.Client) -> None:
    began = time.monotonic()
    response = send(client, case)
    label = f"{case.method.upper()} {case.path}"
    SECONDS[label] += time.monotonic() - began
    CASES[label] += 1
    STATUSES[response.status_code] += 1
    # A multipart form has no way to send an empty array or a null apart from leaving the
    # field out, so "invalid" form values schemathesis generates may arrive valid.
    multipart = (case.media_type or "").startswith("multipart/")
    case.validate_response(response, checks=CHECKS, excluded_checks=[negative_data_rejection] if multipart else None)
    kind = response.headers.get("content-type", "")
    if response.status_code >= 400:
        assert kind.startswith("application/json"), f"{label}: error as {kind!r}"
        check_error_body(response.status_code, response.json(), label)
    elif kind.startswith("text/event-stream"):
        check_events(response.text, label)


def test_the_fuzz_reached_every_operation() -> None:
    """Thousands of cases, every operation among them."""
    operations = [f"{r.ok().method.upper()} {r.ok().path}" for r in schema.get_all_operations()]
    total = sum(CASES.values())
    per = {op: f"{CASES[op]} in {SECONDS[op]:.1f}s" for op in operations}
    others = total - sum(CASES[op] for op in operations)  # methods the document does not name: 405
    summary = f"{total} cases: {per}, {others} with other methods; statuses {dict(sorted(STATUSES.items()))}"
    print(summary)
    assert total >= MIN_CASES, summary
    assert [op for op in operations if not CASES[op]] == [], summary
    assert not [s for s in STATUSES if s >= 500], summary


def test_every_daemon_survived(asuite: Suite, client: httpx.Client) -> None:
    for name, child in asuite.children.items():
        assert child.exit_code() is None, f"{name} died: {child.describe_exit()}"
    asuite.wait_api_ready(timeout=30)
    r = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "slow answer", r.text
    r = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a quiet harbour"]})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384, r.text
    image = asuite.dir / "page.png"
    scan(PAGES[0]).save(image, dpi=(300, 300))
    r = client.post("/v1/ocr", content=image.read_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert PAGES[0].split()[0].lower() in r.json()["markdown"].lower(), r.text
    r = client.post("/v1/documents", params={"filename": "after-fuzz.txt"},
                    content=b"The lighthouse keeper logs the tide at dawn.\n",
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hits = client.post("/v1/search", json={"query": "lighthouse keeper tide", "mode": "text"}).json()["data"]
        if any(h["path"].endswith("after-fuzz.txt") for h in hits):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the ingestion daemon never indexed a file uploaded after the fuzz")


# What the fuzz found, each once more on its own: a 5xx before the fix in daemons/router/
# or daemons/bus/, or an error object of the wrong type, or a value silently picked.
REGRESSIONS: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    # A document id past SQLite's 64-bit integers reached apsw (OverflowError: 500).
    ("GET", "/v1/documents/11462665117031526400", {}, 400, "path.file_id"),
    ("DELETE", "/v1/documents/18446744073709551616", {}, 400, "path.file_id"),
    ("GET", "/v1/documents", {"params": {"after": str(2**64)}}, 400, "query.after"),
    # Integers past 64 bits could not be packed for the bus (OverflowError: 500).
    ("POST", "/v1/embeddings", {"json": {"model": "minilm", "input": [[2**70]]}}, 400, None),
    ("POST", "/v1/chat/completions", {"json": {
        "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"default": 10**30}}}]}}, 400, None),
    # A path no file name can hold made realpath raise (ValueError: 500).
    ("POST", "/v1/ocr", {"json": {"path": "/in\u0000box"}}, 400, "path"),
    ("POST", "/v1/ocr", {"content": b'{"path": "/\\udacd\\udcf2"}', "headers": {"Content-Type": "application/json"}},
     400, "path"),
    # A worker's 4xx (the OCR daemon's 422 for an empty file) was typed "server_error".
    ("POST", "/v1/ocr", {"content": b"", "headers": {"Content-Type": "application/pdf"}}, 422, None),
    # A form field or query parameter given twice: one of the values was silently used.
    ("POST", "/v1/ocr", {"files": {"file": ("a.png", b"x")}, "data": {"dpi": ["100", "200"]}}, 400, "dpi"),
    ("POST", "/v1/ocr?dpi=100&dpi=200", {"content": b"x", "headers": {"Content-Type": "image/png"}}, 400, "dpi"),
    ("POST", "/v1/documents?filename=a.txt&filename=b.txt", {"content": b"x"}, 400, "filename"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "param"), REGRESSIONS)
def test_what_the_fuzz_found(client: httpx.Client, method: str, path: str, kwargs: dict[str, Any], status: int,
                             param: str | None) -> None:
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    check_error_body(status, r.json(), f"{method} {path}")
    assert r.json()["error"]["type"] == "invalid_request_error", r.text
    if param is not None:
        assert r.json()["error"]["param"] == param, r.text

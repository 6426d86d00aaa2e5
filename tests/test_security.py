"""Security properties of a running suite, each shown against the real daemons:

1. Who may connect: api.sock is 0660 with the socket group (onebox where that group
   exists, else the router's own group, as `socket_group = ""` says), bus.sock 0600; a
   process that dropped to another uid connects to api.sock only while in that group,
   and never to bus.sock (tests/test_listeners.py has the probe and the 0640 case).
2. Identity is the socket peer's uid (SO_PEERCRED) or an API key, whatever else the
   request's headers or body say: read back from the ledger's principal column.
3. Request bodies over router.max_body_bytes get 413 with an OpenAI error body, with a
   Content-Length, chunked, or lying about their length; the router serves on.
4. Prompt, completion, embedding, search and document text are not logged, at the
   default log level and at debug.
5. Secrets (a provider key from a credential file, API keys from `onebox keys`) are not
   in any log, ledger.db or its -wal, /v1/status, /metrics, /v1/keys or a backup's plain
   text; a key put in the config file or the environment is refused or warned about.
(The systemd exposure of each unit is tests/system/test_systemd.py::test_unit_exposure.)

One suite for the module: router (with loopback TCP), smollm2, the minilm embedding
daemon and ingestion with one collection, at the DEFAULT log level, in front of a fake
upstream provider on loopback (tests/fakes/upstream.py). The last test restarts every
daemon at debug.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import secrets
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemons.config import ConfigError, load
from tests.fakes.upstream import FakeUpstream
from tests.harness import READY_TIMEOUT, Suite, write_config
from tests.test_listeners import OUTSIDER, as_user, connect_as, free_port

GGUF = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
LIMIT = 65536  # router.max_body_bytes here: small, so an oversized body is cheap to send
UPLOAD_LIMIT = 65536  # [ingest] max_file_bytes: POST /v1/documents has its own limit
LISTED_UID = 65532  # [principals.alice] uids: a name a header might try to claim
UPSTREAM_KEY = f"sk-sec-{secrets.token_hex(16)}"
WRONG_KEY = f"sk-wrong-{secrets.token_hex(16)}"  # provider "bad" sends it; the fake echoes it in a 401

# Headers a proxy or another service might set, and a naive server might trust.
SPOOFED = {
    "X-Forwarded-For": "127.0.0.1", "X-Real-Ip": "127.0.0.1", "Forwarded": "for=127.0.0.1;by=127.0.0.1",
    "X-Forwarded-User": "root", "X-Remote-User": "root", "Remote-User": "root", "X-User": "root",
    "X-Authenticated-User": "root", "X-Auth-Request-User": "alice", "X-Forwarded-Email": "root@localhost",
    "X-Onebox-User": "alice", "X-Onebox-Principal": "boss", "X-Principal": "boss", "X-Onebox-Uid": "0",
    "X-Uid": "0", "X-Peer-Uid": str(LISTED_UID), "Proxy-Authorization": "Basic cm9vdDpyb290",
}


def socket_group() -> tuple[str, int]:
    """(socket_group to configure, the gid api.sock should then have)."""
    try:
        return "onebox", grp.getgrnam("onebox").gr_gid
    except KeyError:
        return "", os.getegid()  # dev: the router's own group


def config_text(root: Path, tcp: str, upstream: str) -> str:
    group, _ = socket_group()
    creds = root / "credentials"
    return f"""
[router]
tcp = "{tcp}"
socket_group = "{group}"
max_body_bytes = {LIMIT}
[principals.boss]
admin = true
[principals.alice]
uids = [{LISTED_UID}]
admin = true
[providers.up]
kind = "openai"
base_url = "{upstream}/v1"
key_file = "{creds / 'up'}"
retries = 0
[providers.bad]
kind = "openai"
base_url = "{upstream}/v1"
key_file = "{creds / 'bad'}"
retries = 0
[remote_models.upmodel]
provider = "up"
model = "fake"
[remote_models.badmodel]
provider = "bad"
[embeddings.minilm]
path = "{GGUF}"
threads = 1
[ingest]
settle_s = 0.3
backoff_s = 0.2
backoff_max_s = 1.0
max_file_bytes = {UPLOAD_LIMIT}
[collections.docs]
folder = "{root / 'inbox' / 'docs'}"
"""


def at_default_log_level(config: Path) -> Path:
    """The harness logs at debug; this suite runs at the level a fresh install has."""
    text = config.read_text()
    plain = text.replace('[log]\nlevel = "debug"\n', "")
    assert plain != text, "tests/harness.py no longer writes [log] level the way this test expects"
    config.write_text(plain)
    assert load(config, env={}).log.level == "info"  # etc/onebox/onebox.toml's default
    return config


@dataclass
class Box:
    suite: Suite
    tcp: str
    fake: FakeUpstream
    keys: dict[str, str]  # principal -> a key made with `onebox keys create`

    @property
    def state(self) -> Path:
        return self.suite.dir / "state"

    def uds(self) -> httpx.Client:
        return self.suite.client(timeout=120)

    def tcp_client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=f"http://{self.tcp}", headers=headers, timeout=120, trust_env=False)

    def logs(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.suite.dir.glob("*.log"))}


def onebox(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemons.ctl.main", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


def start_all(suite: Suite, env: dict[str, str] | None = None) -> None:
    """(Re)start the router, then the other daemons side by side (each still waited for)."""
    suite.start_router(env=env)
    workers = [suite.start_infer(env=env, wait=False), suite.start_daemon("embed", "minilm", env=env, wait=False),
               suite.start_daemon("ingest", env=env, wait=False)]
    for child in workers:
        child.wait_ready(READY_TIMEOUT)
    suite.wait_api_ready(timeout=90)


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d, FakeUpstream(key=UPSTREAM_KEY) as fake:
        root = Path(d)
        root.chmod(0o755)  # other uids may reach run/: only the sockets' modes stand in their way
        creds = root / "credentials"
        creds.mkdir(mode=0o700)
        for name, key in (("up", UPSTREAM_KEY), ("bad", WRONG_KEY)):
            (creds / name).write_text(key + "\n")
            (creds / name).chmod(0o600)
        tcp = f"127.0.0.1:{free_port()}"
        config = at_default_log_level(write_config(root, extra=config_text(root, tcp, fake.url)))
        suite = Suite(root, config)
        try:
            start_all(suite)
            keys = {}
            for principal in ("carol", "boss"):
                made = onebox(config, "keys", "create", principal, "--name", f"security test {principal}")
                assert made.returncode == 0, made.stderr
                keys[principal] = made.stdout.strip()
            yield Box(suite, tcp, fake, keys)
        finally:
            suite.stop()


# -- raw HTTP ------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: onebox", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def parse_reply(raw: bytes) -> Reply:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP reply: {raw[:300]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return Reply(int(status_line.split()[1]), headers, body)


def raw_http(path: Path, head: bytes, parts: Iterable[bytes] = ()) -> Reply:
    """Send `head` then `parts` over the Unix socket as they are, and read the reply until
    the server closes. A server that answered early and closed may refuse the rest."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(path))
        s.sendall(head)
        try:
            for part in parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while not complete(data):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                # A Unix socket closed with unread data in it reads as a reset once
                # everything the server wrote has been read.
                break
            if not chunk:
                break
            data += chunk
    return parse_reply(data)


def complete(data: bytes) -> bool:
    """Whether `data` holds a whole reply that says its length."""
    head, sep, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(sep and found and len(body) >= int(found.group(1)))


def chunked(body: bytes, size: int = 8192) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


# -- the ledger ------------------------------------------------------------------------


def ledger_rows(box: Box, request_ids: list[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    """The ledger rows of these requests, once all of them are written."""
    deadline = time.monotonic() + timeout
    while True:
        with box.uds() as c:
            assert c.get("/v1/usage", params={"since": "1h"}).status_code == 200  # flushes the ledger
        db = sqlite3.connect(f"file:{box.state / 'ledger.db'}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            marks = ",".join("?" * len(request_ids))
            rows = {r["request_id"]: dict(r) for r in
                    db.execute(f"SELECT * FROM calls WHERE request_id IN ({marks})", request_ids)}
        finally:
            db.close()
        if len(rows) == len(request_ids):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger rows missing for {set(request_ids) - set(rows)}")
        time.sleep(0.2)


def chat_body(text: str, model: str = "smollm2", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0, **kw}


def outsider_name() -> str:
    try:
        return f"unix:{pwd.getpwuid(OUTSIDER).pw_name}"
    except KeyError:
        return f"unix:{OUTSIDER}"


# -- 1. who may connect --------------------------------------------------------------


def test_only_the_socket_group_connects_and_nobody_else_reaches_the_bus(box: Box) -> None:
    run = box.suite.run_dir
    api_sock, bus_sock = (run / "api.sock").stat(), (run / "bus.sock").stat()
    _, gid = socket_group()
    # The router's defaults (etc/onebox/onebox.toml): 0660 and the group; the bus is
    # the daemons' alone.
    assert (stat.S_IMODE(api_sock.st_mode), api_sock.st_gid) == (0o660, gid)
    assert stat.S_IMODE(bus_sock.st_mode) == 0o600 and bus_sock.st_uid == os.geteuid()
    paths = [run / "api.sock", run / "bus.sock"]
    assert connect_as(paths) == {"api.sock": "EACCES", "bus.sock": "EACCES"}
    # In the group: api.sock answers (so the directory is no obstacle), the bus still refuses.
    assert connect_as(paths, groups=[gid]) == {"api.sock": "connected", "bus.sock": "EACCES"}
    reply = parse_reply(as_user(["http", str(run / "api.sock")], groups=[gid],
                                stdin=request_bytes("GET", "/health")))
    assert reply.status == 200 and reply.json() == {"status": "ok"}


# -- 2. identity -----------------------------------------------------------------------


def test_headers_and_keys_cannot_change_the_socket_peer(box: Box) -> None:
    """A user in the socket group but in no [principals] table, claiming root, alice (a
    listed uid) and boss (an admin, whose real key it sends), is still itself."""
    _, gid = socket_group()
    claims = {**SPOOFED, "Authorization": f"Bearer {box.keys['boss']}", "X-Api-Key": box.keys["boss"]}
    body = json.dumps(chat_body("Hi.", user="root")).encode()
    sock = str(box.suite.run_dir / "api.sock")
    chat = parse_reply(as_user(["http", sock], groups=[gid],
                               stdin=request_bytes("POST", "/v1/chat/completions", body, claims)))
    assert chat.status == 200, chat.body
    for admin_only in ("/v1/status", "/v1/keys", "/v1/usage"):
        r = parse_reply(as_user(["http", sock], groups=[gid], stdin=request_bytes("GET", admin_only, None, claims)))
        assert r.status == 403, (admin_only, r.body)
        assert outsider_name() in r.json()["error"]["message"]
    # root, saying it is someone else with junk credentials: root.
    with box.uds() as c:
        r = c.post("/v1/chat/completions", json=chat_body("Hi.", user="alice"),
                   headers={**SPOOFED, "Authorization": "Bearer ob-junk-junk", "X-Api-Key": "junk"})
        assert r.status_code == 200, r.text
    rows = ledger_rows(box, [chat.headers["x-request-id"], r.headers["x-request-id"]])
    assert rows[chat.headers["x-request-id"]]["principal"] == outsider_name()
    assert rows[chat.headers["x-request-id"]]["user"] == "root"  # recorded as sent, and only that
    assert rows[r.headers["x-request-id"]]["principal"] == "root"


def test_over_tcp_only_the_key_says_who(box: Box) -> None:
    with box.tcp_client() as c:  # loopback, with every proxy header: still no one
        r = c.post("/v1/chat/completions", json=chat_body("Hi."), headers=SPOOFED)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    with box.tcp_client(box.keys["carol"]) as c:
        r = c.post("/v1/chat/completions", json=chat_body("Hi.", user="boss"),
                   headers={**SPOOFED, "X-Api-Key": box.keys["boss"]})
        assert r.status_code == 200, r.text
        status = c.get("/v1/status", headers={**SPOOFED, "X-Api-Key": box.keys["boss"]})
        assert status.status_code == 403, status.text
    with box.tcp_client(box.keys["boss"]) as c:  # the admin's key is an admin's
        assert c.get("/v1/status").status_code == 200
    assert ledger_rows(box, [r.headers["x-request-id"]])[r.headers["x-request-id"]]["principal"] == "carol"


# -- 3. body limits ------------------------------------------------------------------


def assert_413(reply: Reply, limit: int = LIMIT) -> None:
    assert reply.status == 413, (reply.status, reply.body[:300])
    assert reply.json() == {"error": {"message": f"request body larger than {limit} bytes",
                                      "type": "invalid_request_error", "param": None, "code": "body_too_large"}}


def oversized(size: int = LIMIT + 4096) -> bytes:
    text = "a" * size
    return json.dumps({"model": "smollm2", "input": text, "prompt": text, "query": text}).encode()


ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/search", "/v1/keys"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_oversized_bodies_are_413_on_every_endpoint(box: Box, framing: str) -> None:
    sock = box.suite.api_socket
    body = oversized()
    for path in ENDPOINTS:
        if framing == "content-length":
            reply = raw_http(sock, request_bytes("POST", path, body))
        else:
            head = request_bytes("POST", path, headers={"Content-Type": "application/json",
                                                        "Transfer-Encoding": "chunked"})
            reply = raw_http(sock, head, chunked(body))
        assert_413(reply)
    # Over TCP, before any key is asked for.
    with box.tcp_client() as c:
        r = c.post("/v1/chat/completions", content=body if framing == "content-length" else iter([body]),
                   headers={"Content-Type": "application/json"})
        assert_413(Reply(r.status_code, dict(r.headers), r.content))


def test_bodies_that_lie_about_their_length(box: Box) -> None:
    sock = box.suite.api_socket
    # A length far past the limit is refused at once, before a byte of the body is read.
    started = time.monotonic()
    assert_413(raw_http(sock, request_bytes("POST", "/v1/chat/completions",
                                            headers={"Content-Type": "application/json",
                                                     "Content-Length": str(10 ** 12)})))
    assert time.monotonic() - started < 10
    # One chunk that says it is 1 MiB: refused once the limit is passed, mid-chunk.
    head = request_bytes("POST", "/v1/chat/completions", headers={"Transfer-Encoding": "chunked"})
    assert_413(raw_http(sock, head, [b"100000\r\n", b"x" * (LIMIT + 1024)]))
    # A small Content-Length beside a chunked body (request smuggling): the parser must not
    # let the body in on the strength of the small number.
    both = request_bytes("POST", "/v1/chat/completions",
                         headers={"Content-Length": "10", "Transfer-Encoding": "chunked"})
    reply = raw_http(sock, both, chunked(oversized()))
    assert reply.status in (400, 413), (reply.status, reply.body[:300])
    # Not a number.
    reply = raw_http(sock, request_bytes("POST", "/v1/chat/completions", headers={"Content-Length": "12abc"}), [b"{}"])
    assert reply.status in (400, 413), (reply.status, reply.body[:300])


def test_uploads_have_their_own_limit_and_leave_nothing(box: Box) -> None:
    inbox = box.suite.dir / "inbox" / "docs"
    before = sorted(p.name for p in inbox.iterdir())
    big = b"word " * (UPLOAD_LIMIT // 5 + 2000)
    head = request_bytes("POST", "/v1/documents?filename=big.txt",
                         headers={"Content-Type": "text/plain", "Transfer-Encoding": "chunked"})
    reply = raw_http(box.suite.api_socket, head, chunked(big))
    assert reply.status == 413, reply.body[:300]
    assert reply.json()["error"]["code"] == "file_too_large"
    with box.uds() as c:
        r = c.post("/v1/documents", params={"filename": "big.txt"}, content=big,
                   headers={"Content-Type": "text/plain"})
        assert r.status_code == 413, r.text
    assert sorted(p.name for p in inbox.iterdir()) == before  # no partial file for ingestion to find


def test_the_router_is_fine_after_the_refusals(box: Box) -> None:
    assert box.suite.children["router"].exit_code() is None
    with box.uds() as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/chat/completions", json=chat_body("Say hi."))
        assert r.status_code == 200, r.text
        # A body just under the limit is read in full, chunked or not.
        near = json.dumps(chat_body("hi " * ((LIMIT - 400) // 3))).encode()
        assert len(near) < LIMIT
        r = c.post("/v1/chat/completions", content=iter([near[:1000], near[1000:]]),
                   headers={"Content-Type": "application/json"})
        assert r.status_code != 413, r.text


# -- 4. prompt text is not logged --------------------------------------------------------


def talk(box: Box, marker: str, doc: str) -> list[str]:
    """Every kind of request, each carrying `marker`; the local model's completions."""
    inbox = box.suite.dir / "inbox" / "docs"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / doc).write_text(f"The archive keeps one rare word, {marker}, in a box of old letters.\n")
    said: list[str] = []
    with box.uds() as c:
        deadline = time.monotonic() + 90
        while True:  # until ingestion has indexed the document
            r = c.post("/v1/search", json={"query": marker, "collection": "docs"})
            assert r.status_code == 200, r.text
            if any(marker in hit["text"] for hit in r.json()["data"]):
                break
            assert time.monotonic() < deadline, "the document was never indexed"
            time.sleep(0.3)
        ask = f"Repeat this word exactly: {marker}"
        r = c.post("/v1/chat/completions", json=chat_body(ask, max_tokens=8))
        assert r.status_code == 200, r.text
        said.append(r.json()["choices"][0]["message"]["content"])
        with c.stream("POST", "/v1/chat/completions", json=chat_body(ask, max_tokens=8, stream=True)) as s:
            assert s.status_code == 200
            pieces = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        said.append("".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"]))
        r = c.post("/v1/completions", json={"model": "smollm2", "prompt": ask, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        said.append(r.json()["choices"][0]["text"])
        r = c.post("/v1/chat/completions", json=chat_body(f"What is {marker}?", rag={"collection": "docs"}))
        assert r.status_code == 200, r.text
        r = c.post("/v1/embeddings", json={"model": "minilm", "input": [f"{marker} embeds", marker]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
        # Through the provider (whose fake shows the text did pass), and failures of
        # every kind with the text in them.
        box.fake.reset()
        r = c.post("/v1/chat/completions", json=chat_body(ask, model="upmodel"))
        assert r.status_code == 200, r.text
        assert marker in json.dumps(box.fake.requests()[-1]["body"])
        assert c.post("/v1/chat/completions", json=chat_body(ask, model="badmodel")).status_code == 502
        assert c.post("/v1/chat/completions", json=chat_body(ask, model=f"no-such-{marker}")).status_code == 404
        assert c.post("/v1/chat/completions", json=chat_body(ask, temperature="hot")).status_code == 400
        assert c.post("/v1/embeddings", json={"model": "minilm", "input": [marker], "dimensions": 3}).status_code == 400
    return said


def assert_not_logged(box: Box, marker: str, said: list[str]) -> None:
    logs = box.logs()
    assert {"router.log", "infer@smollm2.log", "embed@minilm.log", "ingest.log"} <= set(logs), sorted(logs)
    for name, data in logs.items():
        assert marker.encode() not in data, f"prompt text is in {name}"
        for text in said:
            # A whole completion, where it is long enough to be its own.
            if len(text.strip()) >= 16:
                assert text.strip().encode() not in data, f"completion text {text!r} is in {name}"


def test_prompt_text_is_not_logged_at_the_default_level(box: Box) -> None:
    marker = f"quokka{secrets.token_hex(5)}"
    said = talk(box, marker, "letters-info.txt")
    assert_not_logged(box, marker, said)


# -- 5. secrets ----------------------------------------------------------------------


def key_strings(box: Box) -> list[bytes]:
    """The provider keys and the API keys, each API key's secret part on its own too."""
    out = [UPSTREAM_KEY, WRONG_KEY]
    for key in box.keys.values():
        out += [key, key.split("-", 2)[2]]  # ob-<id>-<secret>; the secret may hold a "-"
    return [s.encode() for s in out]


def hmac_strings(box: Box) -> list[bytes]:
    """The HMAC key API keys are hashed with, as stored and in hex."""
    hmac = (box.state / "keys.secret").read_bytes()
    return [hmac, hmac.hex().encode()]


def secret_strings(box: Box) -> list[bytes]:
    return key_strings(box) + hmac_strings(box)


def assert_no_secret(where: str, data: bytes, secrets_: list[bytes]) -> None:
    for s in secrets_:
        assert s not in data, f"a secret is in {where}"


def test_secrets_are_nowhere_to_be_read(box: Box) -> None:
    # Use every secret: the provider's key (from its credential file) and both API keys.
    box.fake.reset()
    with box.tcp_client(box.keys["carol"]) as c:
        r = c.post("/v1/chat/completions", json=chat_body("Hi.", model="upmodel"))
        assert r.status_code == 200, r.text
        # The fake echoes the wrong key in its 401: the router must not repeat it.
        r = c.post("/v1/chat/completions", json=chat_body("Hi.", model="badmodel"))
        assert r.status_code == 502 and WRONG_KEY not in r.text, r.text
        assert c.post("/v1/chat/completions", headers={"Authorization": "Bearer ob-nope-nope"},
                      json=chat_body("Hi.")).status_code == 401
    sent = {req["headers"].get("authorization") for req in box.fake.requests()}
    assert sent == {f"Bearer {UPSTREAM_KEY}", f"Bearer {WRONG_KEY}"}, sent
    with box.tcp_client(box.keys["boss"]) as c:
        shown = {"/v1/status": c.get("/v1/status"), "/metrics": c.get("/metrics"), "/v1/keys": c.get("/v1/keys"),
                 "/v1/usage": c.get("/v1/usage", params={"since": "1h"})}
    for path, reply in shown.items():
        assert reply.status_code == 200, (path, reply.text)
    listed = onebox(box.suite.config, "keys", "list", "--all")
    assert listed.returncode == 0, listed.stderr

    found = secret_strings(box)
    for path, reply in shown.items():
        assert_no_secret(path, reply.content, found)
    assert_no_secret("`onebox keys list`", listed.stdout.encode(), found)
    for name, data in box.logs().items():
        assert_no_secret(name, data, found)
    ledger_files = sorted(box.state.glob("ledger.db*")) + sorted(box.state.glob("keys.db*"))
    assert {"ledger.db", "ledger.db-wal"} <= {p.name for p in ledger_files}, ledger_files
    for f in ledger_files:
        assert_no_secret(f.name, f.read_bytes(), found)

    archive = box.suite.dir / "backup.tar"
    made = onebox(box.suite.config, "backup", str(archive))
    assert made.returncode == 0, made.stderr
    assert_no_secret("`onebox backup`'s output", (made.stdout + made.stderr).encode(), found)
    members: dict[str, bytes] = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            if f is not None:
                members[m.name] = f.read()
    assert {"state/ledger.db", "state/keys.db", "config/onebox.toml"} <= set(members), sorted(members)
    assert not any("credentials" in name for name in members)
    for name, data in members.items():
        # The HMAC key is in a backup on purpose (the keys are useless without it), in
        # its own member only.
        assert_no_secret(f"the backup's {name}", data,
                         key_strings(box) if name == "state/keys.secret" else found)


def test_keys_in_the_config_or_environment_are_refused(fresh_dir: Path) -> None:
    """docs/access.md: keys are never in the config or the environment, only in
    credential files. A key where a key does not belong stops the config with an error
    that does not repeat it."""
    secret = f"sk-inline-{secrets.token_hex(12)}"
    base = "[providers.up]\nkind = \"openai\"\n"
    cases = {
        "a key in the file": (base + f'base_url = "http://127.0.0.1:9/v1"\napi_key = "{secret}"\n', {}),
        "a key through ONEBOX__": (base + 'base_url = "http://127.0.0.1:9/v1"\n',
                                   {"ONEBOX__PROVIDERS__UP__API_KEY": secret}),
        "a key in base_url's user part": (base + f'base_url = "https://user:{secret}@api.example.com/v1"\n', {}),
        "a key in base_url's query": (base + f'base_url = "https://api.example.com/v1?api_key={secret}"\n', {}),
    }
    path = fresh_dir / "onebox.toml"
    for what, (text, env) in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load(path, env=env)
        message = str(caught.value)
        assert "providers.up" in message and secret not in message, (what, message)


def test_a_key_in_the_environment_is_ignored_with_a_warning(box: Box) -> None:
    """OPENAI_API_KEY in the router's environment is not read (keys come from credential
    files); the router says so at start, naming the variable and never its value."""
    secret = f"sk-env-{secrets.token_hex(12)}"
    log = box.suite.log_path("router")
    offset = log.stat().st_size
    box.suite.start_router(env={"OPENAI_API_KEY": secret, "ANTHROPIC_API_KEY": secret})
    box.suite.wait_api_ready(timeout=60)
    text = log.read_bytes()[offset:].decode(errors="replace")
    assert re.search(r"WARNING .*OPENAI_API_KEY.*credential", text), text[-3000:]
    assert "ANTHROPIC_API_KEY" in text
    assert secret not in text
    with box.uds() as c:  # the provider still uses its credential file's key
        box.fake.reset()
        assert c.post("/v1/chat/completions", json=chat_body("Hi.", model="upmodel")).status_code == 200
    assert {r["headers"].get("authorization") for r in box.fake.requests()} == {f"Bearer {UPSTREAM_KEY}"}


# -- 4, again at debug (restarts every daemon: keep it last) ---------------------------


def test_prompt_text_and_secrets_are_not_logged_at_debug(box: Box) -> None:
    """At debug the daemons say much more about each request, but still not its text."""
    start_all(box.suite, env={"ONEBOX_LOG_LEVEL": "debug"})
    marker = f"wombat{secrets.token_hex(5)}"
    said = talk(box, marker, "letters-debug.txt")
    logs = box.logs()
    assert b" DEBUG " in logs["router.log"] and b" DEBUG " in logs["infer@smollm2.log"]
    assert_not_logged(box, marker, said)
    found = secret_strings(box)
    for name, data in logs.items():
        assert_no_secret(name, data, found)

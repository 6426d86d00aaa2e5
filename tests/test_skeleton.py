"""The worker skeleton, the bus client and the registry, with real daemons: an echo
worker written on the skeleton (tests/workers/echo_worker.py, under 40 lines), the
router, and the real inference daemon where a long generation is needed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemons.bus import errors
from daemons.bus.client import AsyncBusClient, BusClient
from daemons.config import BusConfig
from tests.harness import Suite, write_config

ROOT = Path(__file__).resolve().parents[1]
ECHO = ROOT / "tests" / "workers" / "echo_worker.py"
COUNTING = {"kind": "completion", "prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0}


def start_echo(suite: Suite, **kw: object) -> None:
    suite.start_module("echo", "tests.workers.echo_worker", env={"PYTHONPATH": str(ROOT)}, **kw)  # type: ignore[arg-type]


def bus_client(suite: Suite) -> BusClient:
    return BusClient(f"ipc://{suite.run_dir / 'bus.sock'}", BusConfig(heartbeat_interval_s=0.2, client_wait_s=5))


@pytest.fixture(scope="module")
def echo_suite() -> Iterator[Suite]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onebox-") as d:
        suite = Suite(Path(d))
        try:
            suite.start_router()
            start_echo(suite)
            suite.start_infer()
            suite.wait_api_ready()
            yield suite
        finally:
            suite.stop()


def test_echo_worker_is_small() -> None:
    assert len(ECHO.read_text().splitlines()) < 40


def test_echo_worker_shows_in_ready_and_status(echo_suite: Suite) -> None:
    with echo_suite.client() as c:
        ready = c.get("/ready").json()
        assert ready["ready"] is True and ready["services"] == {"echo": 1, "infer/smollm2": 1}, ready
    with bus_client(echo_suite) as bus:
        parts, final = bus.call("echo", {"text": "one two three"}, timeout=10).result()
    assert [p["word"] for p in parts] == ["one", "two", "three"]
    assert final == {"echo": {"text": "one two three"}}
    body = echo_suite.wait_status(lambda b: b["services"]["echo"]["workers"][0].get("echoed", 0) >= 1,
                                  what="the echo worker's status map")
    worker = body["services"]["echo"]["workers"][0]
    assert worker["capacity"] == 8 and worker["pid"] == echo_suite.children["echo"].pid
    assert "echoing" in echo_suite.children["echo"].ready_status


def test_sync_client_streams_cancels_and_times_out(echo_suite: Suite) -> None:
    with bus_client(echo_suite) as bus:
        call = bus.call("infer/smollm2", COUNTING, timeout=60)
        pieces = []
        for kind, data in call:
            pieces.append(data)
            if len(pieces) == 3:
                call.cancel()
                break
        assert len(pieces) == 3 and all("text" in p for p in pieces)
        # The cancel reached the engine: its slot is free again within a few heartbeats.
        echo_suite.wait_status(lambda b: b["models"]["smollm2"]["workers"][0]["slots"]["busy"] == 0,
                               what="the cancelled request to leave its slot")
        t0 = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            bus.call("infer/smollm2", COUNTING, timeout=0.6).result()
        assert time.monotonic() - t0 < 3
        with pytest.raises(errors.RemoteError) as bad:
            bus.call("infer/smollm2", {"kind": "nonsense"}, timeout=10).result()
        assert bad.value.code == 400
        status = bus.request("mmi.status", {}, timeout=5)
        assert set(status["services"]) >= {"echo", "infer/smollm2"}


def test_async_client(echo_suite: Suite) -> None:
    async def go() -> tuple[list[str], dict[str, object]]:
        async with AsyncBusClient(f"ipc://{echo_suite.run_dir / 'bus.sock'}", BusConfig(heartbeat_interval_s=0.2)) as bus:
            calls = [await bus.call("echo", {"text": f"a{i} b{i}"}, timeout=10) for i in range(5)]
            results = await asyncio.gather(*(c.result() for c in calls))
            words = [p["word"] for parts, _ in results for p in parts]
            streamed = await bus.call("infer/smollm2", {**COUNTING, "max_tokens": 5}, timeout=30)
            final: dict[str, object] = {}
            async for kind, data in streamed:
                if kind == "final":
                    final = data
            return words, final
    words, final = asyncio.run(go())
    assert words == [w for i in range(5) for w in (f"a{i}", f"b{i}")]
    assert final["finish_reason"] == "length"


def test_client_waits_for_a_worker_then_fails_typed(fresh_dir: Path) -> None:
    suite = Suite(fresh_dir)
    try:
        suite.start_router()
        with bus_client(suite) as bus:
            t0 = time.monotonic()
            with pytest.raises(errors.NoWorker) as none:
                bus.call("echo", {"text": "x"}, timeout=10, wait_s=0.5).result()
            assert 0.4 < time.monotonic() - t0 < 3 and none.value.code == 503
            # A worker that registers while the call waits gets it.
            call = bus.call("echo", {"text": "late"}, timeout=30, wait_s=20)
            start_echo(suite)
            parts, final = call.result()
            assert [p["word"] for p in parts] == ["late"]
    finally:
        suite.stop()


def test_killed_worker_fails_a_client_call_and_a_restarted_one_is_used(fresh_dir: Path) -> None:
    with_model = write_config(fresh_dir)
    suite = Suite(fresh_dir, with_model)
    try:
        suite.start_router()
        suite.start_infer()
        with bus_client(suite) as bus:
            call = bus.call("infer/smollm2", COUNTING, timeout=60)
            it = iter(call)
            next(it)
            suite.children["infer@smollm2"].signal(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(errors.WorkerLost):
                for _ in it:
                    pass
            assert time.monotonic() - t0 < 5
            suite.start_infer()
            parts, final = bus.call("infer/smollm2", {**COUNTING, "max_tokens": 3}, timeout=30).result()
            assert final["usage"]["completion_tokens"] == 3
    finally:
        suite.stop()


def test_hung_engine_leaves_the_bus_within_three_heartbeats(fresh_dir: Path) -> None:
    """Liveness is progress on the bus too: a hung feeder stops the worker's heartbeats
    (it says DISCONNECT), so requests get 503 at once instead of at the watchdog."""
    interval = 1.0  # the default
    config = write_config(fresh_dir, heartbeat=interval)
    hang = fresh_dir / "hang"
    suite = Suite(fresh_dir, config)
    req = {"model": "smollm2", "prompt": "Hi", "max_tokens": 2}
    try:
        suite.start_router()
        suite.start_infer(env={"ONEBOX_TEST_HANG_FILE": str(hang)})
        suite.wait_api_ready()
        with suite.client(timeout=30) as c:
            assert c.post("/v1/completions", json=req).status_code == 200
            hang.touch()
            t0 = time.monotonic()
            # Short request deadlines, so each probe says how things stand when it was sent.
            while True:
                sent = time.monotonic() - t0
                assert sent < 3 * interval, "still routed to a hung worker"
                if c.post("/v1/completions", json=req, headers={"X-Request-Timeout": "0.2"}).status_code == 503:
                    break
            took = sent
            r = c.post("/v1/completions", json=req)
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker"
            assert c.get("/ready").status_code == 503
            print(f"503 {took:.2f} s after the hang (heartbeat {interval} s)")
            hang.unlink()
            suite.wait_api_ready(timeout=10)
            assert c.post("/v1/completions", json=req).status_code == 200
        log = suite.log_text("infer@smollm2")
        assert "not making progress" in log and "registering afresh" in log
    finally:
        hang.unlink(missing_ok=True)
        suite.stop()


def test_engine_failing_every_turn_exits_70(fresh_dir: Path) -> None:
    """An exception on every turn is not progress: after a few, the daemon exits non-zero
    so systemd restarts it; the request in flight gets a 500 without internals."""
    fail = fresh_dir / "fail"
    suite = Suite(fresh_dir)
    try:
        suite.start_router()
        infer = suite.start_infer(env={"ONEBOX_TEST_FAIL_FILE": str(fail)})
        suite.wait_api_ready()
        with suite.client(timeout=30) as c:
            result: dict[str, httpx.Response] = {}
            t = threading.Thread(target=lambda: result.update(r=c.post("/v1/completions", json={
                "model": "smollm2", "prompt": "1, 2, 3,", "max_tokens": 300, "temperature": 0})))
            t.start()
            time.sleep(0.5)
            fail.touch()
            t.join(30)
            assert result["r"].status_code in (500, 503), result["r"].text
            assert "TestFault" not in result["r"].text
        deadline = time.monotonic() + 20
        while infer.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert infer.exit_code() == 70, suite.log_text("infer@smollm2")[-2000:]
        assert "turns in a row failed" in suite.log_text("infer@smollm2")
    finally:
        fail.unlink(missing_ok=True)
        suite.stop()


def test_onebox_up_runs_a_registered_echo_daemon(fresh_dir: Path) -> None:
    """A daemon is one registry row plus its package: `onebox up` starts it with the rest."""
    wrapper = (
        "import sys\n"
        "from daemons import registry\n"
        "from daemons.ctl import up\n"
        "echo = registry.Daemon(name='echo', module='tests.workers.echo_worker', summary='echo',\n"
        "    unit='onebox-echo.service', sections=('paths', 'log', 'bus'), service='echo', placement='background')\n"
        "sys.exit(up.main(sys.argv[1:], daemons=registry.DAEMONS + (echo,)))\n"
    )
    config = write_config(fresh_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEBOX") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-c", wrapper, "--config", str(config)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while "Ctrl-C stops everything" not in out:
            assert time.monotonic() < deadline and proc.poll() is None, out
            out += proc.stdout.readline()
        assert "echo ready" in out and "infer@smollm2 ready" in out, out
        sock = fresh_dir / "run" / "api.sock"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x", timeout=10) as c:
            assert c.get("/ready").json()["services"]["echo"] == 1
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
        assert "echo exited with code 0" in rest and proc.returncode == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

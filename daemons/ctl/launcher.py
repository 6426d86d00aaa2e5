"""Starting daemons as child processes and waiting for READY=1 the way systemd does.

Each child gets its own NOTIFY_SOCKET (a datagram socket this process reads), so
`onebox up`, the tests and the benchmarks see exactly the sd_notify messages systemd
would. `Suite` is a set of them: started in order, each waited for, stopped in reverse
order, with their logs kept. Every child dies with the process that started it
(PR_SET_PDEATHSIG), the last line of defence when the launcher itself is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from daemons.registry import Instance

log = logging.getLogger(__name__)

EXIT_MEANINGS = {78: "configuration error", 69: "unavailable", 70: "internal error"}
PR_SET_PDEATHSIG = 1


class LaunchError(Exception):
    pass


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child between fork and exec. The signal comes when the thread
        # that forked exits: children are started from the launcher's main thread.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


class Child:
    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], notify_dir: Path,
                 output: IO[bytes] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.notify_path = notify_dir / f"{name.replace('/', '_').replace('@', '_')}.notify"
        self.output = output
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.status = ""
        # The STATUS= sent together with READY=1 (later STATUS lines replace `status`).
        self.ready_status = ""
        self._sock: socket.socket | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.notify_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.notify_path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.notify_path))
        sock.setblocking(False)
        self._sock = sock
        env = {**self.env, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONFAULTHANDLER": "1"}
        # Own session: Ctrl-C reaches only the launcher, which stops children in order.
        self.proc = subprocess.Popen(self.argv, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent(os.getpid()),
                                     stdout=self.output, stderr=subprocess.STDOUT if self.output else None)
        self.ready = False

    def read_notify(self) -> list[str]:
        """Drain pending sd_notify datagrams; returns their lines and tracks READY/STATUS."""
        lines: list[str] = []
        if self._sock is None:
            return lines
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return lines
            datagram = data.decode(errors="replace").splitlines()
            for line in datagram:
                lines.append(line)
                if line == "READY=1":
                    self.ready = True
                elif line.startswith("STATUS="):
                    self.status = line[len("STATUS="):]
            if "READY=1" in datagram:
                self.ready_status = self.status

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def describe_exit(self) -> str:
        code = self.exit_code()
        if code is None:
            return "is running"
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (perhaps out of memory?)" if -code == signal.SIGKILL else ""
            return f"was killed by {name}{hint}"
        meaning = EXIT_MEANINGS.get(code)
        return f"exited with code {code}" + (f" ({meaning})" if meaning else "")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready:
            self.read_notify()
            if self.ready:
                break
            if self.exit_code() is not None:
                raise LaunchError(f"{self.name} {self.describe_exit()} before it was ready")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LaunchError(f"{self.name} not ready after {timeout:.0f} s (last status: {self.status!r})")
            assert self._sock is not None
            select.select([self._sock], [], [], min(remaining, 0.2))

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after the deadline. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; sending SIGKILL", self.name, timeout)
                self.proc.kill()
                self.proc.wait(5)
        self.close()
        return self.proc.returncode

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.notify_path)
            except FileNotFoundError:
                pass


class Suite:
    """Daemons of one config, run as children: `onebox up`, the tests, the benchmarks.

    With `log_dir`, each child's output goes to LOG_DIR/NAME.log (kept after stop);
    without, children write to this process's own stdout and stderr.
    """

    def __init__(self, config_path: Path, env: Mapping[str, str], runtime_dir: Path,
                 log_dir: Path | None = None) -> None:
        self.config_path = config_path
        self.env = dict(env)
        self.runtime_dir = runtime_dir
        self.api_socket = runtime_dir / "api.sock"
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}
        self._logs: list[IO[bytes]] = []

    def log_path(self, name: str) -> Path:
        if self.log_dir is None:
            raise LaunchError("this suite's children write to the terminal, not to log files")
        return self.log_dir / f"{name}.log"

    def log_text(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def start(self, name: str, argv: Sequence[str], wait: float | None = 60.0,
              env: Mapping[str, str] | None = None) -> Child:
        """Start one child (replacing a previous one of that name) and wait for READY."""
        old = self.children.get(name)
        if old is not None:
            old.stop(5)
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path(name), "ab")
            self._logs.append(out)
        child = Child(name, argv, {**self.env, **(env or {})}, self.runtime_dir / "notify", output=out)
        self.children[name] = child
        child.start()
        if wait:
            child.wait_ready(wait)
        return child

    def start_instance(self, inst: Instance, wait: float | None = 60.0, env: Mapping[str, str] | None = None,
                       ) -> Child:
        return self.start(inst.label, inst.argv(self.config_path), wait=wait, env=env)

    def start_all(self, instances: Sequence[Instance], wait: float = 120.0) -> None:
        """In order, each waited for before the next (the router first: it is the broker)."""
        for inst in instances:
            self.start_instance(inst, wait=wait)

    def dead(self) -> Child | None:
        """A child that has exited, if any (for a supervisor loop)."""
        for child in self.children.values():
            child.read_notify()
            if child.exit_code() is not None:
                return child
        return None

    def stop(self, timeout: float = 15.0, on_stopped: Callable[[Child], None] | None = None,
             hurry: Callable[[], bool] | None = None) -> None:
        """SIGTERM to all in reverse start order (the workers, then the broker, so the last
        replies can still reach it), wait up to `timeout` in all, SIGKILL what is left."""
        kids = list(reversed(self.children.values()))
        for child in kids:
            if child.exit_code() is None:
                child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in kids:
            while child.exit_code() is None and time.monotonic() < deadline and not (hurry and hurry()):
                time.sleep(0.05)
            child.stop(timeout=0)
            if on_stopped is not None:
                on_stopped(child)
        for f in self._logs:
            f.close()
        self._logs.clear()

    # -- asking the running suite ------------------------------------------------------

    def client(self, timeout: float = 60.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.api_socket))
        return httpx.Client(transport=transport, base_url="http://onebox", timeout=timeout)

    def async_client(self, timeout: float = 60.0) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.api_socket))
        return httpx.AsyncClient(transport=transport, base_url="http://onebox", timeout=timeout)

    def wait_api_ready(self, timeout: float = 20.0) -> None:
        """Until GET /ready says every enabled service has a live worker."""
        self.wait_for(lambda c: c.get("/ready").status_code == 200, timeout, "GET /ready to say 200")

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                    what: str = "the status") -> dict[str, Any]:
        """GET /v1/status until `predicate(body)` holds; returns that body. Instead of a
        fixed sleep: worker state comes with heartbeats, so it changes a beat later."""
        found: dict[str, Any] = {}

        def check(c: httpx.Client) -> bool:
            found.clear()
            found.update(c.get("/v1/status").json())
            return predicate(found)

        self.wait_for(check, timeout, what)
        return found

    def wait_for(self, check: Callable[[httpx.Client], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        with self.client(timeout=5) as c:
            while time.monotonic() < deadline:
                try:
                    if check(c):
                        return
                except (httpx.TransportError, ValueError, KeyError, IndexError, TypeError) as exc:
                    last = f" (last: {exc!r})"
                time.sleep(0.05)
        raise LaunchError(f"timed out after {timeout:.0f} s waiting for {what}{last}")

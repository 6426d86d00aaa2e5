"""Start a daemon as a child process and wait for READY=1 the way systemd does.

Each child gets its own NOTIFY_SOCKET (a datagram socket this process reads), so
`onebox up` and the tests see exactly the sd_notify messages systemd would.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

EXIT_MEANINGS = {78: "configuration error", 69: "unavailable", 70: "internal error"}


class LaunchError(Exception):
    pass


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

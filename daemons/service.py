"""What every daemon shares: exit codes, logging, sd_notify, watchdog, signals.

A daemon's `main()` calls `load_config_or_exit()`, `setup_logging()`, builds a
`Notifier`, and installs signal handlers that only record the signal (`Signals`);
its own loop acts on them: first signal drains with a deadline, a second escalates.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

import sdnotify

from daemons import config as config_mod
from daemons.config import Config, ConfigError

log = logging.getLogger(__name__)

# sysexits.h; the units map 78 to RestartPreventExitStatus= so a bad config is not retried.
EX_OK = 0
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69
EX_CONFIG = 78

# syslog priorities for the journal's "<N>" line prefix (sd-daemon(3)).
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """Prefix each line with <N> so journald records the priority."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def setup_logging(level: str, name: str) -> None:
    """Configure the root logger once; called only from a daemon's main()."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs of every request would drown the journal; errors still show. httpx logs
    # each upstream call at info; the router logs the ones that fail, with their reason.
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_config_or_exit(path: str | None, sections: Iterable[str] | None = None) -> Config:
    """Load the config (checking `sections`, by default all); on error print what is
    wrong and where, and exit 78."""
    try:
        return config_mod.load(path, sections=sections)
    except ConfigError as exc:
        print(f"onebox: config error: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)


class Notifier:
    """sd_notify messages plus a watchdog fed by progress, not by a timer.

    `progress()` is called by the loop that does the work; it sends WATCHDOG=1 at most
    once per half of WATCHDOG_USEC, so a loop that hangs stops the pings and systemd
    kills the unit.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self._notifier = sdnotify.SystemdNotifier()
        # Never block the daemon's loop on sd_notify: a datagram socket whose reader
        # has stopped reading (a launcher or test harness after READY; the kernel queues
        # only net.unix.max_dgram_qlen = 10 datagrams) would otherwise hang the main
        # thread in send() and stop the bus heartbeats. A full queue drops the message
        # (sdnotify swallows the BlockingIOError).
        if self._notifier.socket is not None:
            self._notifier.socket.setblocking(False)
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._last_ping = 0.0
        self._lock = threading.Lock()

    def send(self, message: str) -> None:
        if self.enabled:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")
        log.info("ready: %s", status)

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float, status: str) -> None:
        """Ask systemd for `seconds` more before it gives up on the start (a slow load)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}\nSTATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send(f"STOPPING=1\nSTATUS={status}")

    def progress(self) -> None:
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last_ping < self.watchdog_interval:
                return
            self._last_ping = now
        self.send("WATCHDOG=1")


class Signals:
    """Records SIGTERM/SIGINT; the daemon's loop reads `count` and acts.

    Handlers only record (gunicorn's rule): no logging, no I/O in signal context.
    """

    def __init__(self) -> None:
        self.count = 0
        self.last: int | None = None
        self.event = threading.Event()

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        for sig in signals:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.last = signum
        self.event.set()

    @property
    def name(self) -> str:
        return signal.Signals(self.last).name if self.last else "none"


def ensure_dir(path: Path, mode: int = 0o755) -> None:
    """Create a runtime/state directory (under systemd, RuntimeDirectory= already did)."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)

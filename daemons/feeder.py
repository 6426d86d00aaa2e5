"""The one thread that runs an engine's turns, shared by every engine that has one.

It places itself (CPU affinity, optional SCHED_FIFO: the inference and embedding
daemons' decode loops), records progress so `alive()` can tell a hang from a long step
(a turn that outlasts its allowance still counts as moving while the thread keeps
using CPU: on a busy 2-core box a step can take thirty times its usual time; one that
neither returns nor computes is hung), and counts failed turns: an exception that recurs on every turn would otherwise fail
requests forever while the watchdog sees progress, so after `max_failures` in a row the
feeder gives up and the daemon exits non-zero for systemd to restart it.

Two test hooks, read from the environment by `TestHooks.from_env()`: while the file
named by ONEBOX_TEST_HANG_FILE exists each turn blocks (a hung decode), and while the
one named by ONEBOX_TEST_FAIL_FILE exists each turn raises (a recurring bug).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
import queue
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from daemons import cpu

log = logging.getLogger(__name__)

T = TypeVar("T")

HANG_FILE_ENV = "ONEBOX_TEST_HANG_FILE"
FAIL_FILE_ENV = "ONEBOX_TEST_FAIL_FILE"
MAX_FAILURES = 5
# A turn still computing after this long is stuck (a busy loop), CPU or not.
HARD_STALL_S = 120.0
# Below this share of one CPU, a thread inside a long turn is waiting, not working.
MIN_CPU_SHARE = 0.01
# The thread's CPU clock is read at most this often (alive() runs on every main-loop turn).
CPU_SAMPLE_S = 0.25


class TestFault(RuntimeError):
    """Raised by the fail hook (tests only)."""


@dataclass(frozen=True)
class TestHooks:
    hang_file: str = ""
    fail_file: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TestHooks:
        env = os.environ if env is None else env
        hooks = cls(env.get(HANG_FILE_ENV, ""), env.get(FAIL_FILE_ENV, ""))
        if hooks.hang_file:
            log.warning("test hook %s=%s is set: the feeder blocks while that file exists", HANG_FILE_ENV,
                        hooks.hang_file)
        if hooks.fail_file:
            log.warning("test hook %s=%s is set: engine turns fail while that file exists", FAIL_FILE_ENV,
                        hooks.fail_file)
        return hooks

    def on_turn(self) -> None:
        while self.hang_file and Path(self.hang_file).exists():
            time.sleep(0.05)
        if self.fail_file and Path(self.fail_file).exists():
            raise TestFault(f"test fault: {self.fail_file} exists")


class Feeder:
    """Runs `turn()` in a loop on its own thread until stopped.

    `turn()` must come back often (at most a fraction of a second when idle); before
    something long (a big decode step) it calls `expect(seconds)` so that `alive()` does
    not mistake that step for a hang. `on_failure(exc)` is called after a turn raised,
    to fail what was in flight.
    """

    def __init__(self, turn: Callable[[], None], on_failure: Callable[[Exception], None], *,
                 cpus: str = "", priority: int = 0, stall_s: float = 1.0, max_failures: int = MAX_FAILURES,
                 hooks: TestHooks | None = None, name: str = "feeder") -> None:
        self._turn = turn
        self._on_failure = on_failure
        self.cpus = cpu.parse_cpus(cpus)
        self.priority = priority
        self.stall_s = stall_s
        self.max_failures = max_failures
        self.hooks = hooks or TestHooks()
        self.beat = time.monotonic()
        self._allow = 0.0
        self._cpu_samples: deque[tuple[float, float]] = deque()
        self._computing = True
        self.failures = 0
        # Why the feeder gave up, once it has.
        self.failed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.beat = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the loop to end; True once it has (False: it is stuck in a turn)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def progress(self) -> None:
        """A long turn is still moving (called between its pieces)."""
        self.beat = time.monotonic()
        self._allow = 0.0

    def expect(self, seconds: float) -> None:
        """The current turn may legitimately take up to `seconds` from now."""
        self._allow = time.monotonic() - self.beat + seconds

    def alive(self) -> bool:
        if self.failed is not None or not self._thread.is_alive():
            return False
        now = time.monotonic()
        computing = self._using_cpu(now)
        age = now - self.beat
        if age < max(self.stall_s, self._allow):
            return True
        return age < HARD_STALL_S and computing

    def _using_cpu(self, now: float) -> bool:
        """Whether the feeder thread used CPU over about the last `stall_s`, from samples
        of its CPU clock taken every CPU_SAMPLE_S by the callers of alive()."""
        samples = self._cpu_samples
        if samples and now - samples[-1][0] < CPU_SAMPLE_S:
            return self._computing
        try:
            cpu = time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident or 0))
        except (OSError, ValueError):
            return False
        samples.append((now, cpu))
        while len(samples) > 2 and now - samples[1][0] >= self.stall_s:
            samples.popleft()
        then, cpu_then = samples[0]
        # Too soon to tell counts as computing.
        self._computing = now - then < self.stall_s / 2 or (cpu - cpu_then) / (now - then) >= MIN_CPU_SHARE
        return self._computing

    def _run(self) -> None:
        cpu.pin_current_thread(self.cpus)
        cpu.set_fifo_current_thread(self.priority)
        while not self._stop.is_set():
            self.beat = time.monotonic()
            self._allow = 0.0
            try:
                self.hooks.on_turn()
                self._turn()
                self.failures = 0
            except Exception as exc:
                self.failures += 1
                log.exception("engine turn failed (%d in a row)", self.failures)
                try:
                    self._on_failure(exc)
                except Exception:
                    log.exception("failing the requests in flight failed too")
                if self.failures >= self.max_failures:
                    self.failed = (f"{self.failures} engine turns in a row failed, the last with "
                                   f"{type(exc).__name__}: {exc}")
                    log.critical("giving up: %s; exiting so that the daemon is restarted", self.failed)
                    return


class Inbox(Generic[T]):
    """What the bus's main thread hands an engine's feeder: new work and cancels, and a
    wake-up for a feeder waiting on an empty turn."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._cancels: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def put(self, item: T) -> None:
        self._items.put(item)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)
        self._wake.set()

    def take_cancels(self) -> set[str]:
        with self._lock:
            cancels, self._cancels = self._cancels, set()
        return cancels

    def take(self) -> list[T]:
        out: list[T] = []
        while True:
            try:
                out.append(self._items.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float) -> None:
        """Until something arrives (or stop() is asked), at most `timeout` seconds."""
        self._wake.wait(timeout)
        self._wake.clear()

    def wake(self) -> None:
        self._wake.set()


class OnFeeder:
    """For an engine whose loop is one Feeder: its health is the feeder's."""

    feeder: Feeder

    def alive(self) -> bool:
        return self.feeder.alive()

    def failed(self) -> str | None:
        return self.feeder.failed

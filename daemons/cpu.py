"""CPU placement for latency-critical threads: affinity, SCHED_FIFO, topology."""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)


def parse_cpus(spec: str) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}; empty -> empty set (no pinning)."""
    cpus: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad CPU list {spec!r}")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def online_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))


def pin_current_thread(cpus: set[int]) -> None:
    """Restrict the calling thread (not the process) to `cpus`; logs and ignores failure."""
    if not cpus:
        return
    usable = cpus & online_cpus()
    if not usable:
        log.warning("none of CPUs %s is available to this process; not pinning", sorted(cpus))
        return
    os.sched_setaffinity(threading.get_native_id(), usable)
    log.info("thread %s pinned to CPUs %s", threading.current_thread().name, sorted(usable))


def name_current_thread() -> None:
    """Give the kernel thread the Python thread's name (Python 3.11 does not), so `ps -L`,
    `top -H` and /proc/PID/task/TID/comm show e.g. "feeder"; best effort."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_name = 15
        libc.prctl(pr_set_name, threading.current_thread().name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_fifo_current_thread(priority: int) -> bool:
    """Switch the calling thread to SCHED_FIFO at `priority`; one warning if not allowed."""
    name_current_thread()
    if priority <= 0:
        return False
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError:
        log.warning(
            "cannot switch thread %s to SCHED_FIFO %d: not permitted; grant CAP_SYS_NICE "
            "(AmbientCapabilities=CAP_SYS_NICE in the unit) or raise LimitRTPRIO; running at normal priority",
            threading.current_thread().name, priority,
        )
        return False
    log.info("thread %s runs SCHED_FIFO priority %d", threading.current_thread().name, priority)
    return True

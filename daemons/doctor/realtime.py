"""Whether the feeder (the decode thread) will get the SCHED_FIFO priority it is given.

Read, never tried: switching a throwaway thread to SCHED_FIFO would be a real-time
thread on a box that may be serving. What decides it is RLIMIT_RTPRIO, CAP_SYS_NICE in
the effective set (/proc/self/status) and, under systemd, the unit, which grants
CAP_SYS_NICE with AmbientCapabilities= because LimitRTPRIO= can be clamped by the host.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Mapping
from pathlib import Path

from daemons.doctor.cgroups import pid1_is_systemd
from daemons.doctor.result import Result, Status, read

AREA = "scheduling"
CAP_SYS_NICE = 23
UNITS = "etc/systemd/system"
# v1 cpu hierarchies (named either way) that show RT group scheduling (CONFIG_RT_GROUP_SCHED).
RT_GROUP_FILES = ("sys/fs/cgroup/cpu/cpu.rt_runtime_us", "sys/fs/cgroup/cpu,cpuacct/cpu.rt_runtime_us")


def cap_eff(root: Path) -> int | None:
    status = read(root, "proc/self/status") or ""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.M)
    return int(m.group(1), 16) if m else None


def dropin_priority(root: Path) -> int:
    """FEEDER_PRIORITY from `onebox tune`'s drop-in: it overrides the config in every instance."""
    text = read(root, f"{UNITS}/onebox-infer@.service.d/tune.conf") or ""
    m = re.search(r"^Environment=ONEBOX__MODELS__%i__FEEDER_PRIORITY=(\d+)$", text, re.M)
    return int(m.group(1)) if m else 0


def unit_grants_nice(root: Path) -> bool:
    unit = read(root, f"{UNITS}/onebox-infer@.service") or ""
    return bool(re.search(r"^AmbientCapabilities=.*\bCAP_SYS_NICE\b", unit, re.M))


def _limit(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else str(n)


def check_realtime(root: Path, priorities: Mapping[str, int], recommended: int,
                   rlimit: tuple[int, int] | None = None) -> Result:
    """`priorities`: each model's configured feeder_priority; `recommended`: what onebox
    tune gives the feeder on this box (0 on a small one)."""
    name = "feeder real-time priority"
    soft, hard = rlimit if rlimit is not None else resource.getrlimit(resource.RLIMIT_RTPRIO)
    caps = cap_eff(root)
    nice = caps is not None and bool(caps >> CAP_SYS_NICE & 1)
    clamp = ", which only CAP_SYS_NICE gets past" if hard == 0 else ""
    this = (f"this process: RLIMIT_RTPRIO {_limit(soft)} (hard {_limit(hard)}{clamp}), CAP_SYS_NICE "
            f"{'yes' if nice else 'no' if caps is not None else 'unknown'}")
    override = dropin_priority(root)
    wanted = {m: override or p for m, p in priorities.items() if override or p > 0}
    if not wanted:
        if recommended:
            return Result(AREA, name, "warn",
                          f"feeder_priority is 0 for every model, where onebox tune gives the feeder SCHED_FIFO "
                          f"{recommended} on this box (so a decode step is never preempted by "
                          f"background work); {this}",
                          "onebox tune --emit /etc/systemd/system (its drop-in sets it), or feeder_priority = "
                          f"{recommended} in [models.NAME]")
        return Result(AREA, name, "ok",
                      "feeder_priority is 0 for every model: the feeder runs at normal priority, as onebox tune "
                      "recommends on a box this small (a real-time thread on one of few cores would starve the "
                      f"router and the OS); {this}")
    top = max(wanted.values())
    models = ", ".join(f"{m} {p}" for m, p in sorted(wanted.items()))
    can_here = nice or soft == resource.RLIM_INFINITY or soft >= top
    problems: list[tuple[str, str]] = []
    status: Status
    if any(read(root, f) is not None for f in RT_GROUP_FILES):
        problems.append(("the kernel schedules real-time time per cgroup (cpu.rt_runtime_us in the v1 cpu "
                         "hierarchy): a unit in a cpu cgroup of its own gets 0 us there, and SCHED_FIFO fails "
                         "with EPERM even with CAP_SYS_NICE",
                         "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1), or give the unit's cpu "
                         "cgroup real-time runtime (cpu.rt_runtime_us)"))
    if read(root, "proc/sys/kernel/sched_rt_runtime_us") == "-1":
        problems.append(("kernel.sched_rt_runtime_us is -1: no real-time throttling, so a spinning SCHED_FIFO "
                         "thread can hold a CPU forever", "sysctl kernel.sched_rt_runtime_us=950000 (the default)"))
    if pid1_is_systemd(root) and unit_grants_nice(root):
        status, evidence, fix = "ok", (f"feeder_priority {models}: the installed unit grants CAP_SYS_NICE "
                                       f"(AmbientCapabilities=), so the feeder can switch to SCHED_FIFO; {this}"), ""
    elif can_here:
        status, evidence, fix = "ok", (f"feeder_priority {models}: {this}, so a feeder started from here "
                                       "(onebox up) can switch to SCHED_FIFO"), ""
    else:
        status = "warn"
        evidence = (f"feeder_priority {models}, but {this}: run by `onebox up` as this user, the feeder "
                    "logs one warning and runs at normal priority. Under systemd the unit grants CAP_SYS_NICE "
                    "(AmbientCapabilities=CAP_SYS_NICE), which is what makes it work there")
        fix = ("run the models as units (sudo scripts/install); for `onebox up`, an rtprio limit for this user "
               f"(`USER - rtprio {top}` in /etc/security/limits.d/onebox.conf), where the host does not clamp it")
    for why, how in problems:
        status, evidence, fix = "warn", f"{evidence}; {why}", f"{fix}; {how}" if fix else how
    return Result(AREA, name, status, evidence, fix)

"""Run every check, and print the results: a table per area with its fixes, a summary."""

from __future__ import annotations

import functools
import json
import shutil
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemons.config import Config
from daemons.doctor import cgroups, gpu, kernel, memory, realtime, storage
from daemons.doctor.placement import Placement
from daemons.doctor.result import STATUSES, Result

Check = tuple[str, str, Callable[[], Result]]


def _safe(area: str, name: str, check: Callable[[], Result]) -> Result:
    """One check's result; what it could not read makes it skipped, never stops the others."""
    try:
        return check()
    except PermissionError as exc:
        return Result(area, name, "skipped", f"permission denied reading {exc.filename or exc}: run as root to "
                                             "include it")
    except (OSError, ValueError) as exc:
        return Result(area, name, "skipped", f"could not read what it needs: {exc}")


def run(root: Path, box: Placement, config: Config | None, estimates: list[memory.Estimate],
        config_error: str = "", rlimit: tuple[int, int] | None = None) -> list[Result]:
    """Every check, in the order printed. `box` is what onebox tune reads and recommends;
    without a config (`config_error` says why) the checks that need one are skipped."""
    checks: list[Check] = [
        (kernel.AREA, "isolcpus", lambda: kernel.check_isolcpus(root, box)),
        (kernel.AREA, "nohz_full, rcu_nocbs", lambda: kernel.check_nohz(root, box)),
        (kernel.AREA, "transparent huge pages", lambda: kernel.check_thp(root)),
        (kernel.AREA, "swap", lambda: kernel.check_swap(root)),
        (cgroups.AREA, "init (PID 1)", lambda: cgroups.check_init(root)),
        (cgroups.AREA, "cgroup v2 (CPUWeight=, AllowedCPUs=)", lambda: cgroups.check_cgroup(root)),
    ]
    needs_config: list[tuple[str, str, Callable[[Config], Result]]] = [
        (realtime.AREA, "feeder real-time priority",
         lambda c: realtime.check_realtime(root, {m: mc.feeder_priority for m, mc in c.models.items()},
                                           box.feeder_priority, rlimit)),
        (storage.AREA, "filesystem", lambda c: storage.check_filesystem(root, c.paths.state)),
        (storage.AREA, "mount options (atime)", lambda c: storage.check_mount_options(root, c.paths.state)),
        (storage.AREA, "I/O scheduler", lambda c: storage.check_scheduler(root, c.paths.state)),
        (storage.AREA, "encryption at rest (dm-crypt)", lambda c: storage.check_encryption(root, c.paths.state)),
        (gpu.AREA, "GPU NUMA node",
         lambda c: gpu.check_numa(root, box, {m: mc.feeder_cpus for m, mc in c.models.items()})),
    ]
    results = [Result("config", "config", "ok", f"read {config.source}") if config is not None else
               Result("config", "config", "fail", config_error, "onebox config check lists every error with its key")]
    results += [_safe(*c) for c in checks]
    for area, name, check in needs_config:
        if config is None:
            results.append(Result(area, name, "skipped", "the config could not be read"))
        else:
            results.append(_safe(area, name, functools.partial(check, config)))
    results.append(_safe(gpu.AREA, "GPU PCIe link", lambda: gpu.check_pcie(root, box)))
    if config is None:
        results += [Result(memory.AREA, n, "skipped", "the config could not be read")
                    for n in ("memory_budget_mb", "free memory against the plan")]
    else:
        results.append(_safe(memory.AREA, "memory_budget_mb", lambda: memory.check_budgets(estimates)))
        results.append(_safe(memory.AREA, "free memory against the plan",
                             lambda: memory.check_available(root, estimates, config.source)))
    return results


def counts(results: list[Result]) -> dict[str, int]:
    return {s: sum(r.status == s for r in results) for s in STATUSES}


def summary(results: list[Result]) -> str:
    n = counts(results)
    verdict = (f"{n['fail']} check(s) failed (exit 1)" if n["fail"] else
               f"nothing fails; {n['warn']} thing(s) to change" if n["warn"] else "nothing to change")
    return f"summary: {', '.join(f'{n[s]} {s}' for s in STATUSES)}: {verdict}"


def render(results: list[Result], heading: str, width: int | None = None) -> str:
    width = width or max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    out = [heading]
    areas: dict[str, list[Result]] = {}
    for r in results:
        areas.setdefault(r.area, []).append(r)
    for area, rows in areas.items():
        out += ["", area]
        for r in rows:
            out.append(f"  {r.status:<7} {r.name}")
            out += textwrap.wrap(r.evidence, width, initial_indent=" " * 10, subsequent_indent=" " * 10)
        fixes = [r for r in rows if r.fix and r.status in ("warn", "fail")]
        if fixes:
            out.append("  to change:")
            for r in fixes:
                out += textwrap.wrap(f"{r.name}: {r.fix}", width, initial_indent="    - ", subsequent_indent=" " * 6)
    skipped = [r for r in results if r.status == "skipped"]
    if skipped:
        out += ["", "skipped:"]
        for r in skipped:
            out += textwrap.wrap(f"{r.name}: {r.evidence}", width, initial_indent="  - ", subsequent_indent=" " * 4)
    out += ["", summary(results)]
    return "\n".join(out)


def as_json(results: list[Result], host: dict[str, Any]) -> str:
    return json.dumps({**host, "checks": [r.as_dict() for r in results], "summary": counts(results),
                       "skipped": [{"name": r.name, "why": r.evidence} for r in results if r.status == "skipped"],
                       "ok": not any(r.status == "fail" for r in results)}, indent=2)

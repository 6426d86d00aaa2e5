"""Free memory against what the configured inference daemons will plan for.

The estimates come from `daemons.ctl.doctor_cmd.estimate()` (the one function that says
what each daemon will hold, from the KV planner); these checks only add and compare.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from daemons.doctor.result import Result, mib, read, under
from daemons.infer import memory

AREA = "memory"
# Past this share of MemAvailable, too little is left for the other daemons and the page cache.
TIGHT = 0.85


@dataclass(frozen=True)
class Estimate:
    model: str
    plan: memory.MemoryPlan | None
    why: str = ""  # why there is no plan


def _infer_daemon(args: list[str]) -> tuple[str, str] | None:
    """(model, config file) of an inference daemon's command line, as `onebox up`
    (python -m daemons.infer.main KEY --config F) or its unit (onebox infer KEY --config F)
    starts it; None for any other process."""
    config = args[args.index("--config") + 1] if "--config" in args[:-1] else ""
    for i, arg in enumerate(args[:-1]):
        if arg == "daemons.infer.main" or (arg == "infer" and i > 0 and Path(args[i - 1]).name == "onebox"):
            return args[i + 1], config
    return None


def running_inference(root: Path, names: Iterable[str], config_file: str) -> dict[str, int]:
    """Resident bytes of this config's inference daemons already running: they hold their
    plan now, so MemAvailable no longer includes it. Another suite's daemons (another
    config) are left out: what they hold is theirs."""
    wanted, page = set(names), os.sysconf("SC_PAGE_SIZE")
    ours = os.path.realpath(config_file)
    found: dict[str, int] = {}
    for proc in under(root, "proc").glob("[0-9]*"):
        try:
            args = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            daemon = _infer_daemon(args)
            if daemon is None or daemon[0] not in wanted or (daemon[1] and os.path.realpath(daemon[1]) != ours):
                continue
            found[daemon[0]] = found.get(daemon[0], 0) + int((proc / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or hidden from this user (hidepid)
    return found


def meminfo(root: Path) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in (read(root, "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            out[key] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return out


def _missing(estimates: list[Estimate]) -> str:
    return "; ".join(f"{e.model}: no estimate ({e.why})" for e in estimates if e.plan is None)


def check_budgets(estimates: list[Estimate]) -> Result:
    name = "memory_budget_mb"
    planned = [(e.model, e.plan) for e in estimates if e.plan is not None]
    if not planned:
        return Result(AREA, name, "skipped", _missing(estimates) or "no [models.NAME] configured")
    over = [(m, p) for m, p in planned if not p.fits]
    said = "; ".join(f"{m}: {mib(p.total)} planned, budget {mib(p.budget)}" for m, p in planned)
    if _missing(estimates):
        said += f"; {_missing(estimates)}"
    if over:
        return Result(AREA, name, "fail",
                      f"{said}: {', '.join(m for m, _ in over)} would exit 78 at start (memory budget exceeded)",
                      "lower kv_tokens in [models.NAME] (KV = cells x bytes per cell), or raise memory_budget_mb")
    return Result(AREA, name, "ok", f"{said}: each fits its budget")


def check_available(root: Path, estimates: list[Estimate], config_file: str) -> Result:
    name = "free memory against the plan"
    planned = [(e.model, e.plan) for e in estimates if e.plan is not None]
    if not planned:
        return Result(AREA, name, "skipped", _missing(estimates) or "no [models.NAME] configured")
    info = meminfo(root)
    if "MemAvailable" not in info:
        return Result(AREA, name, "skipped", "no MemAvailable in /proc/meminfo")
    running = running_inference(root, [m for m, _ in planned], config_file)
    available = info["MemAvailable"] + sum(running.values())
    total = sum(p.total for _, p in planned)
    said = "; ".join(f"{m}: {p.describe().rpartition('; budget')[0]}" for m, p in planned)
    said += (f"; in all {mib(total)} against {mib(available)} available (MemAvailable {mib(info['MemAvailable'])}"
             + (f" + {mib(sum(running.values()))} held by running {', '.join(sorted(running))}" if running else "")
             + (f", of {mib(info['MemTotal'])}" if "MemTotal" in info else "")
             + "); the embedding, OCR and ingestion daemons are not counted")
    if _missing(estimates):
        said += f"; {_missing(estimates)}"
    fix = ("lower kv_tokens in [models.NAME], use a smaller quantization of the model, or stop what else holds "
           "memory on this box")
    if total > available:
        return Result(AREA, name, "fail", f"{said}: it does not fit, the daemons would fail to load or be "
                                          "OOM-killed", fix)
    if total > TIGHT * available:
        return Result(AREA, name, "warn", f"{said}: over {TIGHT:.0%} of it, little is left for the router, the "
                                          "other daemons and the page cache the model's weights are read from", fix)
    return Result(AREA, name, "ok", said)

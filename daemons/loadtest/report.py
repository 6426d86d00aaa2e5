"""The run as text (a table, a row a step, the errors, the broke-at line) and as one
JSON document."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemons.loadtest.stats import Dist, Step, Targets

# Per column: header, width.
COLUMNS = (("users", 5), ("requests", 8), ("errors", 6), ("TTFT s p50/p99", 15), ("ITL ms p50/p99", 15),
           ("e2e s p50/p99", 15), ("tok/s", 7), ("req/s", 6))

Hint = Callable[[str], str | None]


def pair(d: Dist | None, digits: int) -> str:
    return "-" if d is None else f"{d.p50:.{digits}f} / {d.p99:.{digits}f}"


def row(step: Step) -> str:
    cells = [f"{step.users}{'*' if step.interrupted else ''}", str(step.requests), str(step.errors),
             pair(step.ttft_s, 2), pair(step.itl_ms, 1), pair(step.e2e_s, 2), f"{step.tokens_per_s:.1f}",
             f"{step.requests_per_s:.2f}"]
    return "  ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS))


def table(steps: list[Step]) -> str:
    lines = ["  ".join(h.rjust(w) for h, w in COLUMNS)]
    lines += [row(s) for s in steps]
    if any(s.interrupted for s in steps):
        s = next(s for s in steps if s.interrupted)
        lines.append(f"  * interrupted after {s.window_s:.1f} of {s.planned_s:g} s"
                     + (f", {s.cancelled} request(s) in flight dropped" if s.cancelled else ""))
    return "\n".join(lines)


def error_lines(steps: list[Step], hint: Hint) -> list[str]:
    """Each step's errors by kind, with the first message of each (and what to do, where
    the command knows)."""
    lines: list[str] = []
    for s in steps:
        if not s.errors:
            continue
        lines.append(f"errors at {s.users} user(s):")
        for kind, n in s.errors_by_kind.items():
            sample = s.error_samples.get(kind, "")
            extra = hint(kind)
            lines.append(f"  {kind} x{n}" + (f": {sample}" if sample else "") + (f" ({extra})" if extra else ""))
    return lines


def broke_line(steps: list[Step], broke_at: int | None, total_steps: int, targets: Targets) -> str:
    if broke_at is not None:
        s = steps[broke_at]
        return f"broke at {s.users} user(s) (step {broke_at + 1} of {total_steps}): {s.broke}"
    if not steps:
        return "no step finished"
    last = steps[-1]
    measured = []
    if last.ttft_s is not None:
        measured.append(f"p99 TTFT {last.ttft_s.p99:.2f} s")
    if last.e2e_s is not None:
        measured.append(f"p99 end-to-end {last.e2e_s.p99:.2f} s")
    wanted = [f"errors <= {targets.max_error_rate:.1%}"]
    if targets.p99_ttft_s is not None:
        wanted.append(f"p99 TTFT <= {targets.p99_ttft_s:g} s")
    if targets.p99_e2e_s is not None:
        wanted.append(f"p99 end-to-end <= {targets.p99_e2e_s:g} s")
    figures = f" ({', '.join(measured)})" if measured else ""
    if last.interrupted or len(steps) < total_steps:
        return f"interrupted at {last.users} user(s), not broken so far{figures}; targets: {', '.join(wanted)}"
    return f"did not break: up to {last.users} user(s){figures}; targets: {', '.join(wanted)}"


def document(meta: dict[str, Any], steps: list[Step], broke_at: int | None, interrupted: bool,
             targets: Targets) -> dict[str, Any]:
    broke = None
    if broke_at is not None:
        broke = {"step": broke_at + 1, "users": steps[broke_at].users, "reason": steps[broke_at].broke}
    return {**meta, "targets": targets.to_json(), "interrupted": interrupted, "broke_at": broke,
            "steps": [s.to_json() for s in steps]}

"""The run as a PNG: latency (TTFT and end-to-end, p50 and p99) and throughput against
users, with the step where it broke marked.

Imported only for --plot: matplotlib takes about a second to import. It draws on a bare
Figure with the Agg canvas, never through pyplot, so no GUI backend is looked for and
no global figure state is touched (this works without a display, over ssh, in cron)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from daemons.loadtest.stats import Dist, Step, Targets

BROKE = "#c0392b"


def _values(steps: list[Step], pick: str, which: str) -> list[float]:
    out = []
    for s in steps:
        d: Dist | None = getattr(s, pick)
        out.append(math.nan if d is None else float(getattr(d, which)))
    return out


def plot(path: Path, steps: list[Step], broke_at: int | None, targets: Targets, title: str) -> None:
    fig = Figure(figsize=(8, 7), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    latency, throughput = fig.subplots(2, 1, sharex=True)
    users = [s.users for s in steps]

    for pick, name, color in (("ttft_s", "TTFT", "#1f77b4"), ("e2e_s", "end-to-end", "#2ca02c")):
        latency.plot(users, _values(steps, pick, "p50"), marker="o", color=color, label=f"{name} p50")
        latency.plot(users, _values(steps, pick, "p99"), marker="o", linestyle="--", color=color,
                     label=f"{name} p99")
    for target, name, color in ((targets.p99_ttft_s, "TTFT", "#1f77b4"), (targets.p99_e2e_s, "e2e", "#2ca02c")):
        if target is not None:
            latency.axhline(target, color=color, linestyle=":", linewidth=1, label=f"{name} p99 target")
    latency.set_ylabel("latency (s)")
    if any(v > 0 for v in _values(steps, "e2e_s", "p99") + _values(steps, "ttft_s", "p99") if not math.isnan(v)):
        latency.set_yscale("log")  # TTFT in tens of ms and end-to-end in seconds, on one axis
    latency.grid(True, which="both", alpha=0.3)
    latency.set_title(title, fontsize=10)

    throughput.plot(users, [s.tokens_per_s for s in steps], marker="o", color="#9467bd", label="tokens/s")
    throughput.set_ylabel("tokens/s")
    throughput.set_xlabel("users")
    throughput.set_ylim(0, max([s.tokens_per_s for s in steps] + [1.0]) * 1.15)
    throughput.grid(True, alpha=0.3)
    if any(s.errors for s in steps):
        rate = throughput.twinx()
        rate.bar(users, [100 * s.error_rate for s in steps], width=[u * 0.25 for u in users], color=BROKE,
                 alpha=0.35, label="errors %")
        rate.set_ylabel("errors (% of requests)", color=BROKE)
        rate.set_ylim(0, 100)
        rate.legend(loc="upper right", fontsize=8)

    # Users double from step to step: a log axis spaces them evenly; ticks at the steps.
    throughput.set_xscale("log", base=2)
    throughput.xaxis.set_major_locator(FixedLocator(users))
    throughput.xaxis.set_minor_locator(NullLocator())
    throughput.set_xticklabels([str(u) for u in users])
    throughput.set_xlim(min(users) / 1.3, max(users) * 1.3)

    if broke_at is not None:
        at = steps[broke_at].users
        for ax in (latency, throughput):
            ax.axvline(at, color=BROKE, linestyle="--", linewidth=1.5)
        last = at == max(users)  # then the label goes left of the line, inside the axes
        latency.annotate(f"broke at {at} users", xy=(at, 1), xycoords=("data", "axes fraction"),
                         xytext=(-4 if last else 4, -14), textcoords="offset points", color=BROKE, fontsize=9,
                         ha="right" if last else "left")
    latency.legend(loc="upper left", fontsize=8)
    throughput.legend(loc="upper left", fontsize=8)
    fig.savefig(path, format="png")

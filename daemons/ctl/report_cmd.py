"""`onebox report FILE.html`: one self-contained page a sysadmin can hand on — the host
checks, the memory plan, the CPU placement `onebox tune` recommends, the last load test
with its chart, and the data-protection facts (daemons/ctl/protection.py)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from daemons import __version__
from daemons.config import Config, ConfigError
from daemons.ctl import api, protection, tune

SECTIONS = ("paths", "router", "models", "embeddings", "collections", "principals", "costs", "providers",
            "remote_models", "auth", "ingest")


def tune_section() -> dict[str, Any]:
    topo = tune.read_topology()
    p = tune.plan(topo)
    return {"header": tune.header(topo), "cmdline": tune.kernel_cmdline(topo, p), "files": tune.render(topo, p)}


def doctor_section(config: Config) -> tuple[list[dict[str, str]], str]:
    try:
        from daemons.ctl import doctor_cmd
    except ImportError:
        return [], "onebox doctor is not installed here"
    return doctor_cmd.report_rows(config), ""


def plan_section(config: Config) -> tuple[list[dict[str, str]], str]:
    if not config.models:
        return [], "no [models.NAME] configured"
    try:
        from daemons.ctl import plan_cmd
    except ImportError:
        return [], "onebox plan is not installed here"
    return plan_cmd.report_plans(config), ""


def loadtest_section(path: Path | None) -> tuple[dict[str, Any] | None, str]:
    if path is None:
        return None, "no load test given (onebox loadtest --json F, then onebox report --loadtest F)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"cannot read the load test {path}: {exc}"
    steps = data.get("steps") or []
    columns = ["users", "requests", "errors", "TTFT p50 s", "TTFT p99 s", "inter-token p50 ms",
               "inter-token p99 ms", "e2e p50 s", "e2e p99 s", "tokens/s"]

    def dist(step: dict[str, Any], key: str, which: str) -> str:
        d = step.get(key) or {}
        return f"{d[which]:.3f}" if isinstance(d, dict) and which in d else "-"

    rows = [[str(st.get("users", "")), str(st.get("requests", "")), str(st.get("errors", "")),
             dist(st, "ttft_s", "p50"), dist(st, "ttft_s", "p99"), dist(st, "itl_ms", "p50"),
             dist(st, "itl_ms", "p99"), dist(st, "e2e_s", "p50"), dist(st, "e2e_s", "p99"),
             f"{float(st.get('tokens_per_s', 0)):.1f}"] for st in steps]
    broke = data.get("broke_at")
    summary = (f"{data.get('mix', '?')} mix against {data.get('model', '?')}, up to "
               f"{steps[-1].get('users', '?') if steps else '?'} users; "
               + (f"it broke at {broke['users']} users: {broke['reason']}" if isinstance(broke, dict)
                  else "it did not break"))
    return {"columns": columns, "rows": rows, "summary": summary}, ""


def render(config: Config, loadtest: Path | None, chart: Path | None) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(t))) + "Z" if t else ""
    template = env.from_string(resources.files("daemons.ctl").joinpath("report_template.html").read_text())
    doctor, doctor_note = doctor_section(config)
    plans, plan_note = plan_section(config)
    lt, lt_note = loadtest_section(loadtest)
    image = base64.b64encode(chart.read_bytes()).decode() if chart is not None and chart.exists() else ""
    return template.render(
        host=socket.gethostname(), version=__version__, config_source=config.source,
        written=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        doctor=doctor, doctor_note=doctor_note, plans=plans, plan_note=plan_note, tune=tune_section(),
        loadtest=lt, loadtest_note=lt_note, chart=image, protection=protection.report(config))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="onebox report",
        description="Write one self-contained HTML page to hand on: host checks (doctor), memory plan, CPU "
                    "placement (tune), the last load test with its chart, and the data-protection facts a GDPR "
                    "Article 28 review asks for (where data lives and for how long, encryption at rest, who can "
                    "reach the socket, principals and models, whether any request left the box).")
    p.add_argument("file", type=Path, help="the HTML file to write")
    p.add_argument("--loadtest", type=Path, metavar="JSON", help="a load test's results (onebox loadtest --json)")
    p.add_argument("--chart", type=Path, metavar="PNG", help="its chart (onebox loadtest --plot)")
    p.add_argument("--config", help="config file (default: $ONEBOX_CONFIG, else /etc/onebox/onebox.toml, else the "
                                    "suite `onebox up` runs from this checkout)")
    args = p.parse_args(argv)
    try:
        config = api.load_config(args.config, SECTIONS)
    except ConfigError as exc:
        return api.failure("onebox report", exc)
    html = render(config, args.loadtest, args.chart)
    tmp = args.file.with_name(f".{args.file.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(html)
        os.replace(tmp, args.file)
    except OSError as exc:
        print(f"onebox report: cannot write {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {args.file} ({len(html) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`onebox status`: the suite on one screen a sysadmin reads in five seconds.

Each daemon the config enables, as systemd sees it (when systemd runs the box) and as
the router's bus sees it (live workers, pid, uptime, version); each chat model's engine
numbers; the embedding and OCR backlog; ingestion's queue and quarantine; today's
ledger totals. Everything comes from the router (GET /v1/status and /v1/usage, which
need an admin; GET /ready and /v1/documents for anyone else) and from `systemctl show`.
A router that does not answer is said first, and then what systemd and ledger.db still
tell. Exit status: 0 when everything enabled is up, 1 when something is not, 69 when the
router does not answer, 78 for a config error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import httpx

from daemons import __version__, registry
from daemons.config import Config, ConfigError
from daemons.ctl import api
from daemons.ctl.api import APIError, Endpoint
from daemons.ledger import open_ledger, parse_since, totals
from daemons.ledger.files import ledger_path
from daemons.store import StoreError

PROG = "onebox status"
# What registry.instances() and the ledger fallback read; errors elsewhere are not ours.
SECTIONS = ("paths", "models", "embeddings", "ocr", "ingest", "collections", "costs")
EX_DOWN = 1
# Short: a status screen that hangs is worse than one that says the router is slow. The
# usage query flushes the router's pending ledger rows first (up to 5 s there).
STATUS_TIMEOUT_S = 3.0
USAGE_TIMEOUT_S = 7.0
SYSTEMCTL = "systemctl"
SYSTEMD_PROPS = ("Id", "LoadState", "ActiveState", "SubState", "NRestarts", "ExecMainStartTimestampMonotonic",
                 "MainPID")
DEFAULT_WATCH_S = 2.0
CLEAR = "\x1b[H\x1b[2J"
RED, YELLOW, BOLD, RESET = "\x1b[31m", "\x1b[33m", "\x1b[1m", "\x1b[0m"
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Report = dict[str, Any]


# -- processes ----------------------------------------------------------------------


def probe(path: Path) -> tuple[int | None, OSError | None]:
    """Connect to a Unix socket: the pid of the process listening on it (on the
    connecting side SO_PEERCRED holds the listener's credentials, from its listen()), or
    why it cannot be reached. Done before httpx is asked: httpcore 1.0 leaves its socket
    open when a Unix-socket connect fails."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(STATUS_TIMEOUT_S)
            s.connect(str(path))
            pid, _, _ = _CRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    except OSError as exc:
        return None, exc
    return (pid if pid > 1 else None), None  # pid 1: a socket systemd holds, not the router's


def listener_pid(path: Path) -> int | None:
    return probe(path)[0]


def process_uptime(pid: int) -> float | None:
    """Seconds since a local onebox process started (/proc/PID/stat), None when the pid
    is not one here: another PID namespace or box (over --url), or a reused number."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
        since_boot = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if b"onebox" not in cmdline and b"daemons." not in cmdline:
        return None
    try:
        # Fields after "(comm)", which may hold spaces: the first is field 3, starttime is 22.
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None
    return max(0.0, since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))


# -- systemd ------------------------------------------------------------------------


def systemd_booted() -> bool:
    """sd_booted(3): systemd is PID 1 when /run/systemd/system exists."""
    return os.path.isdir("/run/systemd/system") and shutil.which(SYSTEMCTL) is not None


def parse_show(text: str) -> dict[str, dict[str, str]]:
    """`systemctl show` of several units (blank-line separated KEY=VALUE blocks) by Id."""
    units: dict[str, dict[str, str]] = {}
    for block in text.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if props.get("Id"):
            units[props["Id"]] = props
    return units


def systemd_units(units: list[str]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Each unit's state from one `systemctl show`, and a note when there is none to
    have (not under systemd, systemctl failing, no onebox unit installed)."""
    if not systemd_booted():
        return {}, "not under systemd"
    try:
        r = subprocess.run([SYSTEMCTL, "show", "--no-pager", "-p", ",".join(SYSTEMD_PROPS), *units],
                           capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {}, f"systemctl show failed: {exc}"
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[0]
        return {}, f"systemctl show failed: {first}"
    shown = parse_show(r.stdout)
    now = time.monotonic()  # CLOCK_MONOTONIC, the clock of systemd's ...Monotonic stamps
    out: dict[str, dict[str, Any]] = {}
    for unit in units:
        p = shown.get(unit, {})
        started = _int(p.get("ExecMainStartTimestampMonotonic"))
        active = p.get("ActiveState", "unknown")
        out[unit] = {"load": p.get("LoadState", "unknown"), "active": active, "sub": p.get("SubState", ""),
                     "restarts": _int(p.get("NRestarts")), "main_pid": _int(p.get("MainPID")) or None,
                     "uptime_s": round(now - started / 1e6, 1) if started and active == "active" else None}
    if out and all(u["load"] == "not-found" for u in out.values()):
        # A development box with systemd: `onebox up` runs the suite, no unit is installed.
        return {}, "not under systemd (no onebox unit installed)"
    return out, None


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


# -- the router ---------------------------------------------------------------------


def ask_router(endpoint: Endpoint, want_documents: bool) -> Report:
    """What the router says: its status (or, for a caller who is not an admin, /ready),
    today's usage, the index's counts when ingestion is enabled, and its pid when it is
    on a local socket."""
    out: Report = {"answering": False, "error": None, "admin": False, "status": None, "ready": None,
                   "usage": None, "usage_error": None, "documents": None, "pid": None}
    if endpoint.socket is not None:
        out["pid"], failed = probe(endpoint.socket)
        if failed is not None:
            # The same line the other tools print for it (permission, not running, ...).
            timeout = isinstance(failed, TimeoutError)
            err = httpx.ConnectTimeout(str(failed)) if timeout else httpx.ConnectError(str(failed))
            out["error"] = api.explain(err, endpoint).message
            return out
    with api.API(endpoint, timeout=STATUS_TIMEOUT_S) as client:
        try:
            out["status"] = client.json("GET", "/v1/status")
            out["answering"] = out["admin"] = True
        except APIError as exc:
            if not exc.reachable:
                out["error"] = exc.message
                return out
            out["answering"] = True
            if exc.status not in (401, 403):
                out["error"] = exc.message
            out["ready"] = _ready(client)
        if out["admin"]:
            try:
                out["usage"] = client.json("GET", "/v1/usage", params={"since": "today"}, timeout=USAGE_TIMEOUT_S)
            except APIError as exc:
                out["usage_error"] = exc.message
        if want_documents:
            try:
                out["documents"] = client.json("GET", "/v1/documents", params={"limit": 1}).get("counts")
            except APIError:
                pass  # no index yet, or not allowed: the ingest line says what it knows
    return out


def _ready(client: api.API) -> dict[str, Any] | None:
    # GET /ready answers 503 while something is missing: its body is what we want either way.
    try:
        body = client.http.get("/ready").json()
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def ledger_today(config: Config) -> tuple[dict[str, Any] | None, str | None]:
    """Today's totals read from ledger.db itself, for when the router cannot say."""
    path = ledger_path(config)
    if not path.exists():
        return None, f"no ledger at {path}"
    since = parse_since("today", time.time())
    try:
        db = open_ledger(path, readonly=True)
        try:
            total = totals(db, since, None)
        finally:
            db.close()
    except (StoreError, apsw.Error, OSError) as exc:
        return None, f"cannot read {path}: {exc}"
    return {"since": since, "currency": config.costs.currency, "total": total, "source": str(path)}, None


# -- the report ---------------------------------------------------------------------


def collect(config: Config, endpoint: Endpoint) -> Report:
    """Everything `--json` prints; `render` draws the same as text."""
    instances = registry.instances(config)
    units, systemd_note = systemd_units([i.unit for i in instances])
    ingest_on = any(i.daemon is registry.INGEST for i in instances)
    router = ask_router(endpoint, ingest_on)
    status: dict[str, Any] = router["status"] or {}
    services: dict[str, Any] = dict(status.get("services") or {})
    ready_counts: dict[str, int] = dict((router["ready"] or {}).get("services") or {})

    router_pid = router["pid"] if router["answering"] else None
    daemons = []
    for inst in instances:
        unit = units.get(inst.unit)
        if inst.service is None:
            entry = _router_entry(router, status, unit, router_pid)
        else:
            entry = _daemon_entry(inst, services.get(inst.service), ready_counts.get(inst.service), router, unit)
        daemons.append({"name": inst.label, "unit": inst.unit, "service": inst.service, **entry,
                        "systemd": unit})
    named = {i.service for i in instances}
    extra = {name: s for name, s in services.items() if name not in named and s.get("workers")}

    usage: dict[str, Any] | None
    usage_note: str | None = None
    if router["usage"] is not None:
        usage = {"since": router["usage"].get("since"), "currency": router["usage"].get("currency"),
                 "total": router["usage"].get("total") or {}, "source": "router"}
    else:
        usage, usage_note = ledger_today(config)
        if router["usage_error"]:
            usage_note = f"{router['usage_error']}; {usage_note or 'from ledger.db'}"

    report: Report = {
        "object": "onebox.status", "at": time.time(), "version": __version__, "config": config.source,
        "endpoint": str(endpoint),
        "systemd": {"running": not systemd_note, "note": systemd_note, "units": units},
        "router": {"answering": router["answering"], "error": router["error"], "admin": router["admin"],
                   "bus_clients": status.get("bus_clients"), "ledger": status.get("ledger")},
        "daemons": daemons,
        "models": status.get("models") or {},
        "remote_models": status.get("remote_models") or {},
        "extra_services": extra,
        "ingest": _ingest(ingest_on, services.get("ingest"), router["documents"]),
        "usage": usage, "usage_note": usage_note,
    }
    report["down"] = [d["name"] for d in daemons if d["state"] != "up"]
    report["exit"] = api.EX_UNAVAILABLE if not router["answering"] else EX_DOWN if report["down"] else 0
    return report


def _router_entry(router: Report, status: dict[str, Any], unit: dict[str, Any] | None,
                  pid: int | None) -> dict[str, Any]:
    # `router` in /v1/status (pid, version, started_at) is read when the router sends it.
    reported = status.get("router")
    own: dict[str, Any] = reported if isinstance(reported, dict) else {}
    pid = pid or own.get("pid") or (unit or {}).get("main_pid")
    state = "up" if router["answering"] else "down"
    if router["answering"] and router["error"]:
        note = router["error"]
    elif router["answering"] and not router["admin"]:
        note = "not an admin: engine numbers need root, the router's user or an admin API key"
    elif router["answering"]:
        ledger = status.get("ledger") or {}
        note = f"bus clients {status.get('bus_clients', '?')}, ledger pending {ledger.get('pending', '?')}"
    else:
        note = "not answering (above)"
    up = _uptime(pid, unit, own.get("started_at")) if router["answering"] or unit else None
    return {"state": state, "workers": [], "pid": pid, "uptime_s": up, "version": own.get("version"),
            "restarts": (unit or {}).get("restarts"), "note": note}


def _daemon_entry(inst: registry.Instance, service: dict[str, Any] | None, ready: int | None, router: Report,
                  unit: dict[str, Any] | None) -> dict[str, Any]:
    workers: list[dict[str, Any]] = list((service or {}).get("workers") or [])
    live = [w for w in workers if not w.get("draining")]
    first = (live or workers or [{}])[0]
    pid = first.get("pid") or (unit or {}).get("main_pid")
    active = (unit or {}).get("active")
    if not router["answering"]:
        # No bus view: what systemd says is all there is.
        state = "down" if active in ("failed", "inactive", "deactivating") else "unknown"
        note = "the router does not answer: no bus view" + (f" (systemd: {active})" if active else "")
    elif live or (ready and not workers):  # /ready counts workers only (not an admin)
        state, note = "up", _note(inst.daemon, first)
        if len(live) > 1:
            note = f"{len(live)} workers; " + note
    elif workers:
        state, note = "draining", f"finishing {sum(int(w.get('in_flight', 0)) for w in workers)} request(s)"
    elif active == "activating":
        state, note = "starting", f"systemd is starting it; not on the bus yet ({inst.service})"
    else:
        state = "down"
        why = "not running, or its engine is stuck" if unit is None else f"see journalctl -u {inst.unit}"
        note = f"no live worker for {inst.service} on the bus ({why})"
    return {"state": state, "workers": workers, "pid": pid if workers or active == "active" else None,
            "uptime_s": _uptime(pid, unit, first.get("started_at")) if workers or active == "active" else None,
            # Not "version": in READY that is the bus protocol's (an int), kept out of meta.
            "version": first.get("onebox_version"), "restarts": (unit or {}).get("restarts"), "note": note}


def _uptime(pid: Any, unit: dict[str, Any] | None, started_at: Any = None) -> float | None:
    """From /proc when the pid is a local onebox process, else systemd's start time, else
    the start time the daemon reports (unix time; over --url it is all there is)."""
    if isinstance(pid, int):
        up = process_uptime(pid)
        if up is not None:
            return round(up, 1)
    if (unit or {}).get("uptime_s") is not None:
        return float((unit or {})["uptime_s"])
    if isinstance(started_at, (int, float)) and not isinstance(started_at, bool):
        return round(max(0.0, time.time() - started_at), 1)
    return None


def _note(daemon: registry.Daemon, w: dict[str, Any]) -> str:
    """A daemon's own line: its backlog (embed, OCR) or its load (infer, ingest)."""
    if daemon is registry.EMBED:
        return (f"queue {w.get('queue', '?')} ({w.get('inputs_waiting', '?')} inputs waiting), "
                f"{w.get('inputs_per_s', '?')} inputs/s")
    if daemon is registry.OCR:
        text = (f"busy {w.get('busy', '?')}/{w.get('workers', '?')}, queue {w.get('queue', '?')}/"
                f"{w.get('queue_limit', '?')}, {w.get('pages_per_s', '?')} pages/s")
        return text + (f", {w['restarts']} pool process restart(s)" if w.get("restarts") else "")
    if daemon is registry.INGEST:
        return f"{w.get('files_per_min', '?')} files/min, embed queue {w.get('embed_queue', '?')}"
    if "capacity" in w:
        return f"{w.get('engine', '?')} engine, {w.get('in_flight', 0)}/{w['capacity']} in flight"
    return ""


def _ingest(enabled: bool, service: dict[str, Any] | None, documents: dict[str, Any] | None,
            ) -> dict[str, Any] | None:
    if not enabled:
        return None
    workers = (service or {}).get("workers") or []
    if workers and isinstance(workers[0].get("files"), dict):
        return {"files": workers[0]["files"], "pending": workers[0].get("pending"), "source": "ingest"}
    if documents:
        return {"files": documents, "pending": None, "source": "index"}
    return {"files": None, "pending": None, "source": None}


# -- drawing ------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def render(report: Report, colour: bool = False, watch: float | None = None) -> str:
    paint: Callable[[str, str], str] = (lambda text, code: f"{code}{text}{RESET}") if colour else (
        lambda text, code: text)
    lines: list[str] = []
    router = report["router"]
    if not router["answering"]:
        # First, so that it is what a person reads first.
        lines.append(paint(f"!! ROUTER NOT ANSWERING: {router['error']}", BOLD + RED))
    systemd = report["systemd"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["at"]))
    lines.append(f"onebox {report['version']}  {when}  router {report['endpoint']}  "
                 f"{'under systemd' if systemd['running'] else systemd['note']}"
                 + (f"  (every {watch:g} s, Ctrl-C to stop)" if watch else ""))
    lines += _daemon_lines(report, paint)
    lines += _model_lines(report, paint)
    lines.append(_ingest_line(report["ingest"]))
    lines.append(_usage_line(report["usage"], report["usage_note"]))
    return "\n".join(lines)


def _marked(row: list[str], state: str, paint: Callable[[str, str], str], rendered: str) -> str:
    # The mark makes a problem line stand out with no colour (a pipe, a log, NO_COLOR).
    if state in ("up", ""):
        return "  " + rendered
    code = YELLOW if state in ("starting", "draining", "unknown") else RED
    return paint(("! " if code == RED else "~ ") + rendered, code)


def _daemon_lines(report: Report, paint: Callable[[str, str], str]) -> list[str]:
    daemons: list[dict[str, Any]] = report["daemons"]
    with_systemd = report["systemd"]["running"]
    with_version = any(d.get("version") for d in daemons)
    head = ["DAEMON", "STATE", "PID", "UPTIME"] + (["SYSTEMD", "RESTARTS"] if with_systemd else []) \
        + (["VERSION"] if with_version else []) + ["NOTE"]
    rows = [head]
    for d in daemons:
        unit = d.get("systemd") or {}
        row = [d["name"], d["state"].upper() if d["state"] == "down" else d["state"],
               str(d["pid"]) if d.get("pid") else "-", duration(d.get("uptime_s"))]
        if with_systemd:
            row += [f"{unit.get('active', '?')}/{unit.get('sub', '?')}" if unit else "?",
                    str(unit["restarts"]) if unit.get("restarts") is not None else "-"]
        if with_version:
            row.append(str(d.get("version") or "-"))
        rows.append(row + [d.get("note") or ""])
    for name, s in report["extra_services"].items():
        w = s["workers"][0]
        row = [name, "up", str(w.get("pid", "-")), duration(_uptime(w.get("pid"), None, w.get("started_at")))]
        row += ["", ""] if with_systemd else []
        row += [str(w.get("onebox_version") or "-")] if with_version else []
        rows.append(row + ["on the bus, not in this config"])
    drawn = table(rows)
    states = ["", *[d["state"] for d in daemons], *["up"] * len(report["extra_services"])]
    return [_marked(r, s, paint, text) for r, s, text in zip(rows, states, drawn)]


def _model_lines(report: Report, paint: Callable[[str, str], str]) -> list[str]:
    models: dict[str, Any] = report["models"]
    remote: dict[str, Any] = report["remote_models"]
    if not models and not remote:
        if report["router"]["answering"] and not report["router"]["admin"]:
            return ["  (model numbers need an admin)"]
        return []
    rows = [["MODEL", "ENGINE", "SLOTS", "KV CELLS", "QUEUE", "ROUTER Q", "TOK/S", "PREFIX HITS", "PREEMPTED"]]
    states = [""]
    for name, m in models.items():
        waiting = str((m.get("router_queue") or {}).get("waiting", "-"))
        workers = [w for w in m.get("workers") or [] if not w.get("draining")] or m.get("workers") or []
        if not workers:
            rows.append([name, "DOWN", "-", "-", "-", waiting, "-", "no live worker", "-"])
            states.append("down")
        for w in workers:
            slots, kv, prefix = w.get("slots") or {}, w.get("kv_cells") or {}, w.get("prefix_cache") or {}
            rows.append([name, str(w.get("engine", "?")),
                         f"{slots.get('busy', '?')}/{slots.get('total', '?')}" if slots else "-",
                         _share(kv.get("used"), kv.get("total")), str(w.get("queue", "-")), waiting,
                         str(w.get("tokens_per_s", "-")), _share(prefix.get("hits"), prefix.get("lookups")),
                         str(w.get("preemptions", "-"))])
            states.append("up")
    for name, r in remote.items():
        circuit = str(r.get("circuit", "?"))
        rows.append([name, f"remote:{r.get('provider', '?')}", "-", "-", "-",
                     str((r.get("router_queue") or {}).get("waiting", "-")), "-", f"circuit {circuit}", "-"])
        states.append("up" if circuit == "closed" else "starting")
    drawn = table(rows)
    return [_marked(r, s, paint, text) for r, s, text in zip(rows, states, drawn)]


def _share(part: Any, whole: Any) -> str:
    if not isinstance(part, int) or not isinstance(whole, int):
        return "-"
    return f"{part}/{whole} {100 * part // whole if whole else 0}%"


def _ingest_line(ingest: dict[str, Any] | None) -> str:
    if ingest is None:
        return "  ingest: not enabled"
    files = ingest.get("files")
    if not files:
        return "  ingest: no counts (the daemon is not on the bus and the index cannot be read)"
    text = ", ".join(f"{files.get(k, 0):,} {k}" for k in ("indexed", "queued", "processing", "quarantined"))
    if ingest.get("pending"):
        text += f", {ingest['pending']} settling"
    if ingest["source"] == "index":
        text += " (from index.db: the ingestion daemon is not on the bus)"
    return f"  ingest: {text}"


def _count(n: Any, what: str) -> str:
    n = int(n or 0)
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def _usage_line(usage: dict[str, Any] | None, note: str | None) -> str:
    if usage is None:
        return f"  today: {note or 'no ledger'}"
    t = usage.get("total") or {}
    text = (f"{_count(t.get('calls'), 'call')}, {_count(t.get('errors'), 'error')}, "
            f"{t.get('prompt_tokens', 0):,} prompt + "
            f"{t.get('completion_tokens', 0):,} completion tokens ({t.get('cached_tokens', 0):,} cached), "
            f"cost {float(t.get('cost') or 0):.6f} {usage.get('currency') or ''}".rstrip())
    if usage.get("source") != "router":
        text += " (from ledger.db)"
    return f"  today (UTC): {text}"


# -- the command --------------------------------------------------------------------


def show(report: Report, as_json: bool, colour: bool, watch: float | None) -> None:
    if as_json:
        # One object a screen; watching, one per line (JSON Lines) for a pipe to follow.
        print(json.dumps(report, indent=None if watch else 2, default=str), flush=True)
    else:
        print(render(report, colour, watch), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The suite on one screen: each daemon (systemd's state when systemd runs it, and the "
                    "router's view: pid, uptime, version, restarts), each model's slots, KV cells, queues, "
                    "tokens/s and prefix-cache hits, the embedding and OCR backlog, ingestion's queue and "
                    "quarantine, and today's ledger totals. Engine numbers need an admin (root or the "
                    "router's user on the socket, or an admin API key).",
        epilog="Exit status: 0 everything enabled is up, 1 something is not (starting, draining or down), "
               "69 the router does not answer, 78 config error.")
    p.add_argument("--json", action="store_true", help="print one JSON object with everything")
    p.add_argument("--watch", nargs="?", type=float, const=DEFAULT_WATCH_S, metavar="SECONDS",
                   help=f"redraw every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C")
    api.add_arguments(p)
    args = p.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        p.error("--watch: SECONDS must be more than 0")
    try:
        config = api.load_config(args.config, SECTIONS)
    except ConfigError as exc:
        return api.failure(PROG, exc)
    endpoint = Endpoint.of(config, args.url)
    tty = sys.stdout.isatty()
    colour = tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    code = 130  # Ctrl-C before the first screen; after it, that screen's status
    try:
        if args.watch is None:
            report = collect(config, endpoint)
            show(report, args.json, colour, None)
            return int(report["exit"])
        while True:
            report = collect(config, endpoint)
            code = int(report["exit"])
            if tty and not args.json:
                sys.stdout.write(CLEAR)  # a terminal redraws in place; a pipe gets every screen
            show(report, args.json, colour, args.watch)
            if not tty and not args.json:
                print(flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return code
    except BrokenPipeError:
        # `onebox status | head`: the reader has gone; say nothing more (not even at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

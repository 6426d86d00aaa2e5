"""`onebox status`: against a real router and smollm2 inference daemon (numbers from the
engine, a stopped daemon shown as down, a router that is gone said first), and with a
stand-in `systemctl` for the systemd states."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemons.ctl import api, status_cmd
from tests.harness import clean_env, interrupt, running_suite, write_config

ROOT = Path(__file__).resolve().parents[1]
STATUS = [sys.executable, "-m", "daemons.ctl.status_cmd"]


def status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in clean_env().items() if k != "NO_COLOR"}
    return subprocess.run([*STATUS, "--config", str(config), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=30, check=False)


def line_of(out: str, first_word: str) -> str:
    """The screen's line for a daemon or model (after its two-character mark)."""
    found = [line for line in out.splitlines() if line[2:].split(" ", 1)[0] == first_word]
    assert found, f"no line for {first_word!r} in:\n{out}"
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_help() -> None:
    r = subprocess.run([*STATUS, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: onebox status")
    for needle in ("--json", "--watch [SECONDS]", "--config", "--url", "69 the router does not answer"):
        assert needle in r.stdout, needle


def test_a_live_suite_then_a_stopped_daemon_then_no_router(fresh_dir: Path) -> None:
    port = free_port()
    config = write_config(fresh_dir, extra=f'[router]\ntcp = "127.0.0.1:{port}"\n')
    with running_suite(fresh_dir, config) as suite:
        infer, router = suite.children["infer@smollm2"], suite.children["router"]
        with suite.client() as c:
            r = c.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200, r.text
        # Engine state comes with heartbeats: wait for the one that has served the call.
        raw = suite.wait_status(lambda b: b["models"]["smollm2"]["workers"][0]["served"] >= 1)
        engine = raw["models"]["smollm2"]["workers"][0]

        text = status(config)
        assert text.returncode == 0, text.stdout + text.stderr
        out = text.stdout
        assert "not under systemd" in out.splitlines()[0]
        assert line_of(out, "router").split()[:3] == ["router", "up", str(router.pid)]
        assert line_of(out, "infer@smollm2").split()[:3] == ["infer@smollm2", "up", str(infer.pid)]
        model = line_of(out, "smollm2").split()
        kv = engine["kv_cells"]
        # The numbers are the engine's own (slots from the batch engine, KV cells from its pool).
        assert model[:3] == ["smollm2", "batch", f"0/{engine['slots']['total']}"]
        assert engine["slots"]["total"] == 32
        assert model[3] == f"{kv['used']}/{kv['total']}"
        assert "!" not in out and "DOWN" not in out
        assert "today (UTC): 1 call, 0 errors" in out

        js = status(config, "--json")
        assert js.returncode == 0, js.stderr
        report: dict[str, Any] = json.loads(js.stdout)
        assert report["exit"] == 0 and report["down"] == []
        assert report["router"]["answering"] and report["router"]["admin"]
        assert report["models"]["smollm2"]["workers"][0]["slots"] == {"total": 32, "busy": 0, "free": 32}
        daemons = {d["name"]: d for d in report["daemons"]}
        assert daemons["infer@smollm2"]["pid"] == infer.pid and daemons["router"]["pid"] == router.pid
        assert 0 < daemons["infer@smollm2"]["uptime_s"] <= daemons["router"]["uptime_s"] < 120
        assert report["usage"]["total"]["calls"] == 1 and report["usage"]["source"] == "router"

        # Over TCP with no key the caller is no admin: liveness from /ready, no engine numbers.
        anon = status(config, "--url", f"http://127.0.0.1:{port}")
        assert anon.returncode == 0, anon.stdout + anon.stderr
        assert "not an admin" in line_of(anon.stdout, "router")
        assert line_of(anon.stdout, "infer@smollm2").split()[1] == "up"
        assert "(model numbers need an admin)" in anon.stdout

        infer.stop()  # SIGTERM to its pid; it leaves the bus
        suite.wait_status(lambda b: not b["models"]["smollm2"]["workers"], what="the worker to leave")
        down = status(config)
        assert down.returncode == 1, down.stdout + down.stderr
        line = line_of(down.stdout, "infer@smollm2")
        assert line.startswith("! ") and line.split()[2] == "DOWN" and "no live worker for infer/smollm2" in line
        assert line_of(down.stdout, "smollm2").startswith("! smollm2  DOWN")
        assert "\x1b" not in down.stdout  # no colour into a pipe
        assert json.loads(status(config, "--json").stdout)["down"] == ["infer@smollm2"]

        router.stop()
        gone = status(config)
        assert gone.returncode == 69, gone.stdout + gone.stderr
        first = gone.stdout.splitlines()[0]
        assert first.startswith("!! ROUTER NOT ANSWERING: cannot reach the router at ") and "api.sock" in first
        assert line_of(gone.stdout, "router").split()[:3] == ["!", "router", "DOWN"]
        # The ledger is still there to read.
        assert "today (UTC): 1 call, 0 errors" in gone.stdout and "(from ledger.db)" in gone.stdout


def test_no_router_is_said_first_and_exits_69(fresh_dir: Path) -> None:
    config = write_config(fresh_dir)
    r = status(config)
    assert r.returncode == 69, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"!! ROUTER NOT ANSWERING: cannot reach the router at {fresh_dir / 'run/api.sock'}: " \
                       "is onebox-router running?"
    assert f"today: no ledger at {fresh_dir / 'state/ledger.db'}" in r.stdout
    js = status(config, "--json")
    assert js.returncode == 69
    report = json.loads(js.stdout)
    assert report["router"]["answering"] is False and "cannot reach the router" in report["router"]["error"]
    assert report["exit"] == 69 and report["usage"] is None


def fake_systemctl(directory: Path, started_ago_s: float) -> Path:
    """A `systemctl` that records its arguments and shows a failed router and a running model."""
    started = int((time.monotonic() - started_ago_s) * 1e6)
    script = directory / "systemctl"
    script.write_text(f"""#!/bin/sh
echo "$@" > {directory / "argv"}
cat <<EOF
Id=onebox-router.service
LoadState=loaded
ActiveState=failed
SubState=failed
NRestarts=10
ExecMainStartTimestampMonotonic=0
MainPID=0

Id=onebox-infer@smollm2.service
LoadState=loaded
ActiveState=active
SubState=running
NRestarts=2
ExecMainStartTimestampMonotonic={started}
MainPID=999999
EOF
""")
    script.chmod(0o755)
    return script


def test_systemd_states_still_shown_when_the_router_is_down(fresh_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(fresh_dir)
    monkeypatch.setattr(status_cmd, "systemd_booted", lambda: True)
    monkeypatch.setattr(status_cmd, "SYSTEMCTL", str(fake_systemctl(fresh_dir, 95)))
    assert status_cmd.main(["--config", str(config)]) == 69
    out = capsys.readouterr().out
    argv = (fresh_dir / "argv").read_text().split()
    assert argv[:2] == ["show", "--no-pager"] and argv[-2:] == ["onebox-router.service", "onebox-infer@smollm2.service"]
    assert out.splitlines()[0].startswith("!! ROUTER NOT ANSWERING")
    assert "under systemd" in out.splitlines()[1] and "not under systemd" not in out
    router = line_of(out, "router").split()
    assert router[:2] == ["!", "router"] and router[2:7] == ["DOWN", "-", "-", "failed/failed", "10"]
    infer = line_of(out, "infer@smollm2").split()
    # Its pid is not a local onebox process: the uptime is systemd's.
    assert infer[:4] == ["~", "infer@smollm2", "unknown", "999999"]
    assert infer[4].startswith("1m3") and infer[5:7] == ["active/running", "2"]


def test_parse_show() -> None:
    text = "Id=a.service\nActiveState=active\nNRestarts=1\n\nId=b.service\nActiveState=failed\n"
    assert status_cmd.parse_show(text) == {"a.service": {"Id": "a.service", "ActiveState": "active", "NRestarts": "1"},
                                           "b.service": {"Id": "b.service", "ActiveState": "failed"}}


def test_watch_redraws_until_ctrl_c_and_a_pipe_gets_plain_screens(fresh_dir: Path) -> None:
    config = write_config(fresh_dir)
    proc = subprocess.Popen([*STATUS, "--config", str(config), "--watch", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT)
    time.sleep(2.0)
    out, err = interrupt(proc, timeout=20)
    assert proc.returncode == 69, err  # the last screen's status
    assert out.count("!! ROUTER NOT ANSWERING") >= 2
    assert "(every 0.2 s, Ctrl-C to stop)" in out
    assert "\x1b" not in out and "Traceback" not in err


def test_watch_on_a_terminal_redraws_in_place_in_colour(fresh_dir: Path) -> None:
    config = write_config(fresh_dir)
    master, slave = pty.openpty()
    env = {**{k: v for k, v in clean_env().items() if k != "NO_COLOR"}, "TERM": "xterm"}
    proc = subprocess.Popen([*STATUS, "--config", str(config), "--watch", "0.2"], stdout=slave,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while seen.count(status_cmd.CLEAR.encode()) < 2 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
    finally:
        interrupt(proc, timeout=20)
        os.close(master)
    text = seen.decode(errors="replace")
    assert text.count(status_cmd.CLEAR) >= 2, text
    assert f"{status_cmd.BOLD}{status_cmd.RED}!! ROUTER NOT ANSWERING" in text
    assert proc.returncode == 69


def test_a_bad_watch_interval_is_a_usage_error(fresh_dir: Path) -> None:
    r = status(write_config(fresh_dir), "--watch", "0")
    assert r.returncode == 2 and "--watch: SECONDS must be more than 0" in r.stderr


@pytest.mark.parametrize("seconds, text", [(None, "-"), (5, "5s"), (192, "3m12s"), (7500, "2h05m"),
                                           (2 * 86400 + 3600, "2d01h")])
def test_duration(seconds: float | None, text: str) -> None:
    assert status_cmd.duration(seconds) == text


def test_the_router_is_found_by_its_socket(tmp_path: Path) -> None:
    # SO_PEERCRED on the connecting side names the listener: here, this process.
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        assert status_cmd.listener_pid(path) == os.getpid()
    assert status_cmd.listener_pid(tmp_path / "none.sock") is None


def test_uptime_only_for_a_local_onebox_process() -> None:
    code = "import time; time.sleep(30)"
    ours = subprocess.Popen([sys.executable, "-c", code, "daemons.infer.main"])
    other = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)
        up = status_cmd.process_uptime(ours.pid)
        assert up is not None and 0 <= up < 10
        assert status_cmd.process_uptime(other.pid) is None  # a pid that is not onebox's
    finally:
        for p in (ours, other):
            p.kill()
            p.wait(5)


def test_versions_and_start_times_are_shown_once_the_daemons_report_them(
        fresh_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What /v1/status holds once the router adds "router" and the workers put
    # onebox_version and started_at in their READY (over --url: no /proc to read).
    worker = {"pid": 999999, "capacity": 32, "in_flight": 0, "draining": False, "engine": "batch",
              "onebox_version": "0.2.0", "started_at": time.time() - 125,
              "slots": {"total": 32, "busy": 3, "free": 29}, "queue": 2, "tokens_per_s": 41.5}
    body = {"router": {"pid": 999998, "version": "0.2.0", "started_at": time.time() - 3700},
            "models": {"smollm2": {"workers": [worker], "router_queue": {"waiting": 5}}}, "remote_models": {},
            "services": {"infer/smollm2": {"workers": [worker]}}, "bus_clients": 1,
            "ledger": {"written": 0, "pending": 0}}
    answer = {"answering": True, "error": None, "admin": True, "status": body, "ready": None, "usage": None,
              "usage_error": None, "documents": None, "pid": None}
    monkeypatch.setattr(status_cmd, "ask_router", lambda endpoint, documents: answer)
    config = api.load_config(str(write_config(fresh_dir)), status_cmd.SECTIONS)
    report = status_cmd.collect(config, api.Endpoint(url="http://127.0.0.1:1"))
    out = status_cmd.render(report)
    assert line_of(out, "DAEMON").split()[-2:] == ["VERSION", "NOTE"]
    assert line_of(out, "router").split()[:5] == ["router", "up", "999998", "1h01m", "0.2.0"]
    assert line_of(out, "infer@smollm2").split()[:5] == ["infer@smollm2", "up", "999999", "2m05s", "0.2.0"]
    assert line_of(out, "smollm2").split() == ["smollm2", "batch", "3/32", "-", "2", "5", "41.5", "-", "-"]
    assert report["exit"] == 0

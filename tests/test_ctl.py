"""The `onebox` command: up, --help for every subcommand, config errors, sd_notify."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from daemons.ctl.main import COMMANDS
from tests.harness import Suite, write_config

ROOT = Path(__file__).resolve().parents[1]
ONEBOX = [sys.executable, "-m", "daemons.ctl.main"]


def clean_env(directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEBOX") and k != "NOTIFY_SOCKET"}
    env["ONEBOX_RUNTIME_DIR"] = str(directory / "run")
    env["ONEBOX_STATE_DIR"] = str(directory / "state")
    return env


def read_until(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """What `proc` printed, up to and including `needle` (read from the pipe itself: a
    buffered readline would keep lines that select() then never reports)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{needle!r} not printed within {timeout} s; got:\n{seen.decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"output ended before {needle!r}:\n{seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode(errors="replace")


def start_up(directory: Path) -> subprocess.Popen[str]:
    # The checkout's default config, with sockets and state moved by the environment.
    return subprocess.Popen(ONEBOX + ["up", "--config", str(ROOT / "etc/onebox/onebox.toml")],
                            env=clean_env(directory), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


def test_up_serves_then_stops_on_sigterm(fresh_dir: Path) -> None:
    proc = start_up(fresh_dir)
    try:
        out = read_until(proc, "Ctrl-C stops everything", 90)
        sock = fresh_dir / "run" / "api.sock"
        assert f"API socket: {sock}" in out
        assert "curl --unix-socket" in out
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x", timeout=60) as c:
            r = c.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, rest
        assert "router exited with code 0" in rest
        assert "infer@smollm2 exited with code 0" in rest
    finally:
        stop(proc)


def test_up_reports_which_child_died_and_stops_the_rest(fresh_dir: Path) -> None:
    proc = start_up(fresh_dir)
    try:
        out = read_until(proc, "Ctrl-C stops everything", 90)
        pid = int(re.search(r"infer@smollm2 ready \(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
        router_pid = int(re.search(r"router ready \(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 1
        assert "infer@smollm2 was killed by SIGKILL" in rest
        assert "router exited with code 0" in rest
        assert not Path(f"/proc/{router_pid}").exists() or "zombie" in Path(f"/proc/{router_pid}/status").read_text()
    finally:
        stop(proc)


def test_every_command_has_help_and_is_in_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    top = subprocess.run(ONEBOX + ["--help"], capture_output=True, text=True)
    assert top.returncode == 0
    for name in COMMANDS:
        r = subprocess.run(ONEBOX + [name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert f"usage: onebox {name}" in r.stdout
        assert name in top.stdout
        assert f"`onebox {name}" in readme, f"onebox {name} is not documented in README.md"


def test_unknown_command_is_an_error() -> None:
    r = subprocess.run(ONEBOX + ["frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "invalid choice" in r.stderr


def test_bad_config_exits_78_saying_what_and_where(fresh_dir: Path) -> None:
    bad = fresh_dir / "bad.toml"
    # Each daemon refuses errors in the sections it reads; `up` runs them all, so it reads all.
    everyone = (["router"], ["infer", "smollm2"], ["up"])
    cases = {
        "[router]\nsocket_mode = 660\n": ("router.socket_mode: expected str", (["router"], ["up"])),
        "[router]\ntcp = \"nonsense\"\n": ("router.tcp: expected HOST:PORT", (["router"], ["up"])),
        "[rooter]\n": ("unknown section [rooter]", everyone),
        "[bus]\nheartbeat_interval_s = 0\n": ("bus.heartbeat_interval_s", everyone),
        "[models.smollm2]\npath = 5\n": ("models.smollm2.path: expected str", everyone),
        "not toml [": ("not valid TOML", everyone),
    }
    env = clean_env(fresh_dir)
    for text, (needle, refusing) in cases.items():
        bad.write_text(text)
        for argv in refusing:
            r = subprocess.run(ONEBOX + argv + ["--config", str(bad)], capture_output=True, text=True, env=env,
                               timeout=30)
            assert r.returncode == 78, (argv, text, r.stderr)
            assert str(bad) in r.stderr and needle in r.stderr, r.stderr
    # The inference daemon does not read [router]: an error there is not its business
    # (here it goes on, and stops on its own section's problem: a missing model file).
    bad.write_text('[router]\ntcp = "nonsense"\n[models.smollm2]\npath = "no/such.gguf"\n')
    r = subprocess.run(ONEBOX + ["infer", "smollm2", "--config", str(bad)], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 78 and "not found in" in r.stderr and "router.tcp" not in r.stderr, r.stderr
    r = subprocess.run(ONEBOX + ["infer", "nosuch", "--config", str(ROOT / "etc/onebox/onebox.toml")],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 78 and "no [models.nosuch]" in r.stderr
    missing = write_config(fresh_dir, model={"path": "no/such/model.gguf"})
    r = subprocess.run(ONEBOX + ["infer", "smollm2", "--config", str(missing)],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 78 and "not found in" in r.stderr
    r = subprocess.run(ONEBOX + ["router", "--config", str(fresh_dir / "absent.toml")],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 78 and "config file not found" in r.stderr


def test_config_check_reports_every_error(fresh_dir: Path) -> None:
    bad = fresh_dir / "several.toml"
    bad.write_text('[router]\nsocket_mode = 660\ntcp = "x"\n[bus]\nheartbeat_liveness = 1\n'
                   '[models.a]\nslots = 0\nengine = "fast"\n[models.b]\nthreads = "two"\n[rooter]\n')
    r = subprocess.run(ONEBOX + ["config", "check", "--config", str(bad)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 78, r.stdout + r.stderr
    for needle in ("router.socket_mode: expected str", "router.tcp: expected HOST:PORT",
                   "bus.heartbeat_liveness: must be at least 2", "models.a.slots: must be at least 1",
                   'models.a.engine: expected one of "batch" | "simple"', "models.a.path: required",
                   "models.b.threads: expected int", "models.b.path: required", "unknown section [rooter]"):
        assert needle in r.stderr, (needle, r.stderr)
    assert "9 error(s)" in r.stderr, r.stderr
    good = subprocess.run(ONEBOX + ["config", "check", "--config", str(ROOT / "etc/onebox/onebox.toml")],
                          capture_output=True, text=True, timeout=30)
    assert good.returncode == 0 and "ok" in good.stdout, good.stdout + good.stderr


def test_default_config_file_is_the_declarations() -> None:
    """etc/onebox/onebox.toml is what `onebox config defaults` writes: one source for
    defaults, docs and checks (regenerate it with that command after changing a section)."""
    r = subprocess.run(ONEBOX + ["config", "defaults"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert (ROOT / "etc/onebox/onebox.toml").read_text() == r.stdout


def test_env_overrides_reach_the_config(fresh_dir: Path) -> None:
    from daemons import config

    cfg = config.load(ROOT / "etc/onebox/onebox.toml", {
        "ONEBOX_RUNTIME_DIR": "/tmp/x", "ONEBOX__ROUTER__TCP": "127.0.0.1:9999",
        "ONEBOX__MODELS__SMOLLM2__N_CTX": "1024",
    })
    assert cfg.paths.runtime_dir == "/tmp/x"
    assert cfg.router.tcp == "127.0.0.1:9999"
    assert cfg.models["smollm2"].n_ctx == 1024


def test_journal_priorities_and_watchdog_follow_progress(fresh_dir: Path) -> None:
    """Under systemd-like env: <N> line prefixes, WATCHDOG=1 while the feeder runs, none once it hangs."""
    suite = Suite(fresh_dir)
    hang = fresh_dir / "hang"
    try:
        child = suite.start_infer(env={"JOURNAL_STREAM": "8:12345", "WATCHDOG_USEC": "400000",
                                       "ONEBOX_TEST_HANG_FILE": str(hang)})
        time.sleep(1.0)
        pings = [line for line in child.read_notify() if line == "WATCHDOG=1"]
        assert len(pings) >= 3, pings
        hang.touch()
        # An engine is stalled after 2 s without progress; from then on no ping comes. The
        # hang itself starts at the feeder's next turn, later on a loaded machine, so
        # wait for a quiet 1.5 s window (up to 8 s) rather than a fixed moment.
        time.sleep(2.0)
        quiet = False
        for _ in range(4):
            child.read_notify()
            time.sleep(1.5)
            if "WATCHDOG=1" not in child.read_notify():
                quiet = True
                break
        assert quiet, "watchdog still fed while the feeder is hung"
        hang.unlink()
        time.sleep(1.0)
        assert "WATCHDOG=1" in child.read_notify()
        lines = [line for line in suite.log_text("infer@smollm2").splitlines() if line]
        assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines[:5]
        assert any(line.startswith("<4>") for line in lines)  # the test-hook warning
        assert any(line.startswith("<6>") for line in lines)
    finally:
        suite.stop()


def default_instances() -> list[object]:
    from daemons import config, registry

    return list(registry.instances(config.load(ROOT / "etc/onebox/onebox.toml", {})))


def child_pids(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"ready \(pid (\d+)\)", out)]


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text() or False
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_up_piped_to_tee_stops_its_daemons_on_ctrl_c(fresh_dir: Path) -> None:
    """`onebox up 2>&1 | tee up.log`, then Ctrl-C: tee dies first, and the launcher must
    still stop the router and the inference daemon instead of dying on its stdout."""
    log = fresh_dir / "up.log"
    cmd = f"{' '.join(ONEBOX)} up --config {ROOT / 'etc/onebox/onebox.toml'} 2>&1 | tee {log}"
    shell = subprocess.Popen(["bash", "-c", cmd], env=clean_env(fresh_dir), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops everything" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and shell.poll() is None, log.read_text() if log.exists() else ""
            time.sleep(0.2)
        pids = child_pids(log.read_text())
        assert len(pids) == len(default_instances())  # router, infer@smollm2, embed@minilm, ocr
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group, tee included.
        os.killpg(shell.pid, signal.SIGINT)
        assert wait_gone(pids, 30), "daemons left running after Ctrl-C on a piped onebox up"
    finally:
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shell.wait(10)


def test_daemons_die_with_a_killed_launcher(fresh_dir: Path) -> None:
    """kill -9 of `onebox up` itself: PR_SET_PDEATHSIG stops its children."""
    proc = start_up(fresh_dir)
    try:
        out = read_until(proc, "Ctrl-C stops everything", 90)
        pids = child_pids(out)
        assert len(pids) == len(default_instances())  # router, infer@smollm2, embed@minilm, ocr
        proc.kill()
        proc.wait(10)
        assert wait_gone(pids, 30), "daemons outlived a killed launcher"
    finally:
        stop(proc)

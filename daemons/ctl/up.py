"""`onebox up`: run the suite in the foreground, as systemd would, for development.

Starts the router and one inference daemon per configured model as children, waits
for each READY=1, prints where the API is, and stops everything on Ctrl-C/SIGTERM or
when any child dies (supervision is systemd's job in production, not this one's).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from daemons import config as config_mod
from daemons import service
from daemons.config import Config, ConfigError
from daemons.ctl.launcher import Child, LaunchError

CHECKOUT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def default_config() -> Path:
    local = CHECKOUT / "etc" / "onebox" / "onebox.toml"
    return local if local.is_file() else config_mod.DEFAULT_CONFIG


def dev_env(env: dict[str, str]) -> dict[str, str]:
    """In a checkout, sockets and state go under ./var unless the environment says otherwise."""
    env = dict(env)
    env.setdefault("ONEBOX_RUNTIME_DIR", str(CHECKOUT / "var" / "run"))
    env.setdefault("ONEBOX_STATE_DIR", str(CHECKOUT / "var" / "lib"))
    return env


def daemon_argv(config_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "daemons.ctl.main", *args, "--config", str(config_path)]


def children(config: Config, config_path: Path, env: dict[str, str]) -> list[Child]:
    notify_dir = config.paths.runtime / "notify"
    out = [Child("router", daemon_argv(config_path, "router"), env, notify_dir)]
    for key in config.models:
        out.append(Child(f"infer@{key}", daemon_argv(config_path, "infer", key), env, notify_dir))
    return out


def print_banner(config: Config) -> None:
    sock = config.paths.api_socket
    model = next(iter(config.models), "MODEL")
    print(f"onebox is up. API socket: {sock}")
    if config.router.tcp:
        print(f"  TCP: http://{config.router.tcp}")
    print("  try:")
    print(f"    curl --unix-socket {sock} http://localhost/v1/chat/completions \\")
    print("      -H 'Content-Type: application/json' \\")
    print(f"      -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")
    print("  Ctrl-C stops everything.", flush=True)


def stop_all(kids: list[Child], sigs: service.Signals) -> None:
    # Inference first so in-flight replies can still reach the router, router last.
    for child in reversed(kids):
        if child.exit_code() is None:
            child.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in reversed(kids):
        while child.exit_code() is None and time.monotonic() < deadline and sigs.count < 2:
            time.sleep(0.05)
        child.stop(timeout=0)  # SIGKILL whatever is left
        print(f"onebox: {child.name} {child.describe_exit()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox up",
        description=(
            "Run the router and one inference daemon per configured model in the foreground. "
            "Sockets go to ./var/run and state to ./var/lib of the checkout unless "
            "ONEBOX_RUNTIME_DIR / ONEBOX_STATE_DIR say otherwise. Ctrl-C stops everything."
        ),
    )
    parser.add_argument("--config", type=Path, help="config file (default: the checkout's etc/onebox/onebox.toml)")
    args = parser.parse_args(argv)
    env = dev_env(dict(os.environ))
    config_path = (args.config or default_config()).resolve()
    try:
        config = config_mod.load(config_path, env)
    except ConfigError as exc:
        print(f"onebox: config error: {exc}", file=sys.stderr)
        return service.EX_CONFIG
    service.ensure_dir(config.paths.runtime)
    service.ensure_dir(config.paths.state)
    sigs = service.Signals()
    sigs.install()
    kids = children(config, config_path, env)
    try:
        for child in kids:
            print(f"onebox: starting {child.name}", flush=True)
            child.start()
            child.wait_ready(READY_TIMEOUT_S)
            print(f"onebox: {child.name} ready (pid {child.pid}): {child.ready_status}", flush=True)
            if sigs.count:
                raise LaunchError(f"interrupted by {sigs.name}")
    except LaunchError as exc:
        print(f"onebox: {exc}; stopping", file=sys.stderr, flush=True)
        stop_all(kids, sigs)
        return 1
    print_banner(config)
    code = 0
    while not sigs.count:
        sigs.event.wait(0.5)
        for child in kids:
            child.read_notify()
            if child.exit_code() is not None:
                print(f"onebox: {child.name} {child.describe_exit()}; stopping the rest", file=sys.stderr, flush=True)
                code = 1
                break
        if code:
            break
    if sigs.count:
        print(f"onebox: {sigs.name}: stopping", flush=True)
    stop_all(kids, sigs)
    return code

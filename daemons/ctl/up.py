"""`onebox up`: run the suite in the foreground, as systemd would, for development.

Starts every daemon the config enables (daemons/registry.py) as children, in order,
waits for each READY=1, prints where the API is, and stops everything on Ctrl-C,
SIGTERM or SIGHUP, when any child dies (supervision is systemd's job in production,
not this one's), when its own output goes away (`onebox up | tee log` after tee
died) or when it fails itself. Children also die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from daemons import config as config_mod
from daemons import registry, service
from daemons.config import Config, ConfigError
from daemons.ctl.launcher import LaunchError, Suite

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


class Out:
    """Prints that never kill the launcher: once stdout is gone (a pipe whose reader
    died), the launcher notices and stops the suite instead of dying with it."""

    def __init__(self) -> None:
        self.broken = False

    def check(self) -> None:
        """Notice a pipe whose reader has gone (POLLERR on the write end) without writing."""
        try:
            poller = select.poll()
            poller.register(sys.stdout.fileno(), 0)  # POLLERR and POLLHUP are always reported
            if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0)):
                self.broken = True
        except (OSError, ValueError):
            self.broken = True

    def say(self, text: str, err: bool = False) -> None:
        if self.broken:
            return
        try:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)
        except OSError:  # BrokenPipeError and its kin: nobody is reading any more
            self.broken = True


def banner(config: Config) -> str:
    sock = config.paths.api_socket
    model = next(iter(config.models), "MODEL")
    lines = [f"onebox is up. API socket: {sock}"]
    if config.router.tcp:
        lines.append(f"  TCP: http://{config.router.tcp}")
    lines += [f"  curl --unix-socket {sock} http://localhost/v1/chat/completions \\",
              "      -H 'Content-Type: application/json' \\",
              f"      -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
              "  Ctrl-C stops everything."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, daemons: Sequence[registry.Daemon] = registry.DAEMONS) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox up",
        description=(
            "Run every daemon the config enables (the router, one inference daemon per model, ...) in "
            "the foreground. With the checkout's default config, sockets go to ./var/run and state to "
            "./var/lib unless ONEBOX_RUNTIME_DIR / ONEBOX_STATE_DIR say otherwise; a file given with "
            "--config is used as written. Ctrl-C stops everything."
        ),
    )
    parser.add_argument("--config", type=Path, help="config file (default: the checkout's etc/onebox/onebox.toml)")
    args = parser.parse_args(argv)
    # The checkout's own config names /run and /var/lib; a file given with --config is
    # taken as written.
    env = dict(os.environ) if args.config else dev_env(dict(os.environ))
    config_path = (args.config or default_config()).resolve()
    try:
        config = config_mod.load(config_path, env)
    except ConfigError as exc:
        print(f"onebox: config error: {exc}", file=sys.stderr)
        return service.EX_CONFIG
    service.ensure_dir(config.paths.runtime)
    service.ensure_dir(config.paths.state)
    sigs = service.Signals()
    sigs.install((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    out = Out()
    suite = Suite(config_path, env, config.paths.runtime)
    code = 1
    try:
        code = supervise(suite, registry.instances(config, daemons), config, sigs, out)
    finally:
        # Whatever ended the loop — a signal, a dead child, a broken stdout, a bug here.
        suite.stop(STOP_TIMEOUT_S, on_stopped=lambda c: out.say(f"onebox: {c.name} {c.describe_exit()}"),
                   hurry=lambda: sigs.count >= 2)
    return code


def supervise(suite: Suite, instances: list[registry.Instance], config: Config, sigs: service.Signals,
              out: Out) -> int:
    try:
        for inst in instances:
            out.say(f"onebox: starting {inst.label}")
            child = suite.start_instance(inst, wait=READY_TIMEOUT_S)
            out.say(f"onebox: {child.name} ready (pid {child.pid}): {child.ready_status}")
            if sigs.count:
                raise LaunchError("interrupted")
    except LaunchError as exc:
        why = f"interrupted by {sigs.name}" if sigs.count else str(exc)
        out.say(f"onebox: {why}; stopping", err=True)
        return 1
    out.say(banner(config))
    while not sigs.count and not out.broken:
        sigs.event.wait(0.5)
        dead = suite.dead()
        if dead is not None:
            out.say(f"onebox: {dead.name} {dead.describe_exit()}; stopping the rest", err=True)
            return 1
        out.check()
    if out.broken:
        return 1
    out.say(f"onebox: {sigs.name}: stopping")
    return 0

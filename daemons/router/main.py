"""onebox-router: the HTTP edge and the bus broker, in one asyncio loop under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import socket
import sys
import time

import uvicorn
import zmq.asyncio

from daemons import config as config_mod
from daemons import registry, service
from daemons.bus.broker import Broker
from daemons.config import Config
from daemons.config.providers import NO_KEYS_HERE, keys_in_environment
from daemons.router.app import create_app
from daemons.router.peer import PeerHTTPProtocol
from daemons.router.state import CredentialError, RouterState
from daemons.store import StoreError

log = logging.getLogger("daemons.router")


def unix_listener(path: str, mode: int, group: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listener says it is TCP. Without it Nagle and delayed ACKs add ~40 ms to replies.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def status_line(config: Config, broker: Broker) -> str:
    parts = [f"{name}: {len(broker.live(name))} worker(s)" for name in registry.expected_services(config)]
    return f"serving {config.paths.api_socket}; " + (", ".join(parts) or "no daemons configured")


async def serve(config: Config, notifier: service.Notifier) -> int:
    service.ensure_dir(config.paths.runtime)
    ctx = zmq.asyncio.Context()
    broker = Broker(config.paths.bus_endpoint, config.bus, ctx)
    await broker.start()
    app = create_app(config, broker)
    state: RouterState = app.state.onebox
    rc = config.router
    try:
        state.open()
    except (StoreError, CredentialError, OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        await state.close()
        await broker.stop()
        ctx.term()
        return service.EX_CONFIG if isinstance(exc, (CredentialError, ValueError)) else service.EX_UNAVAILABLE
    try:
        listeners = [unix_listener(str(config.paths.api_socket), rc.mode, rc.socket_group)]
        tcp = rc.tcp_host_port
        if tcp:
            if tcp[0] not in ("127.0.0.1", "::1", "localhost"):
                log.warning("router.tcp %s is not loopback: every caller there needs an API key, sent in clear "
                            "text unless a TLS proxy sits in front", rc.tcp)
            listeners.append(tcp_listener(*tcp))
    except (OSError, KeyError) as exc:
        log.error("cannot listen: %s", exc)
        await state.close()
        await broker.stop()
        ctx.term()
        return service.EX_CONFIG if isinstance(exc, KeyError) else service.EX_UNAVAILABLE

    server = uvicorn.Server(uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False, http=PeerHTTPProtocol,
        timeout_graceful_shutdown=int(rc.shutdown_timeout_s), timeout_keep_alive=30,
    ))

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        where = str(config.paths.api_socket) + (f" and http://{rc.tcp}" if rc.tcp else "")
        notifier.ready(f"listening on {where}")
        last = ""
        while not server.should_exit:
            # The loop being able to run this task is the router's liveness.
            notifier.progress()
            state.dispatch.kick()  # places freed by workers that joined
            line = status_line(config, broker)
            if line != last:
                notifier.status(line)
                last = line
            await asyncio.sleep(0.5)

    task = asyncio.create_task(announce())
    try:
        await server.serve(sockets=listeners)
    finally:
        notifier.stopping("router stopping")
        task.cancel()
        await state.close()  # the ledger writes what it holds
        await broker.stop()
        ctx.term()
        try:
            os.unlink(config.paths.api_socket)
        except FileNotFoundError:
            pass
    log.info("router stopped")
    return service.EX_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox router",
        description="Run the onebox router: the OpenAI-compatible API on a Unix socket and the bus broker.",
    )
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG or /etc/onebox/onebox.toml)")
    args = parser.parse_args(argv)
    config = service.load_config_or_exit(args.config, registry.ROUTER.sections)
    service.setup_logging(config.log.level, "router")
    log.debug("effective config: %s", config_mod.as_dict(config))
    for name in keys_in_environment(os.environ):  # the name only: its value is a secret
        log.warning("%s is set in the router's environment and is ignored: onebox never reads API keys from "
                    "the environment; %s", name, NO_KEYS_HERE)
    # Record signals first: uvicorn captures them during serve() and re-raises them
    # into this handler afterwards, which must not kill the process.
    service.Signals().install()
    started = time.monotonic()
    try:
        return asyncio.run(serve(config, service.Notifier()))
    except Exception:
        log.exception("router failed after %.1f s", time.monotonic() - started)
        return service.EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())

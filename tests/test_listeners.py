"""Where the router listens: the Unix socket with its mode, and optional loopback TCP."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import Suite, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_socket_modes_and_tcp(fresh_dir: Path) -> None:
    port = free_port()
    config = write_config(fresh_dir, extra=f'[router]\ntcp = "127.0.0.1:{port}"\nsocket_mode = "0640"\n')
    suite = Suite(fresh_dir, config)
    try:
        router = suite.start_router()
        assert f"http://127.0.0.1:{port}" in router.ready_status, router.ready_status
        assert stat.S_IMODE((fresh_dir / "run" / "api.sock").stat().st_mode) == 0o640
        assert stat.S_IMODE((fresh_dir / "run" / "bus.sock").stat().st_mode) == 0o600
        made = subprocess.run([sys.executable, "-m", "daemons.ctl.main", "keys", "create", "tester",
                               "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert c.get("/health").json() == {"status": "ok"}
            # Over TCP every caller needs a key.
            r = c.post("/v1/completions", json={"model": "smollm2", "prompt": "x"})
            assert r.status_code == 401, r.text
            # No worker yet: a clear 503 with Retry-After, over TCP as over the socket.
            r = c.post("/v1/completions", json={"model": "smollm2", "prompt": "x"},
                       headers={"Authorization": f"Bearer {made.stdout.strip()}"})
            assert r.status_code == 503 and "Retry-After" in r.headers
        suite.stop()
        assert not (fresh_dir / "run" / "api.sock").exists(), "api.sock left behind after a clean stop"
    finally:
        suite.stop()


def test_tcp_listener_is_tcp_so_replies_are_not_delayed() -> None:
    """asyncio turns Nagle off (TCP_NODELAY) on accepted connections only when the
    listener was made with IPPROTO_TCP; with proto 0 each small reply waited ~40 ms."""
    import asyncio

    from daemons.router.main import tcp_listener

    sock = tcp_listener("127.0.0.1", free_port())
    try:
        assert sock.proto == socket.IPPROTO_TCP

        async def accepted_nodelay() -> int:
            result: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                raw = writer.get_extra_info("socket")
                result.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                writer.close()

            server = await asyncio.start_server(connected, sock=sock)
            _, w = await asyncio.open_connection(*sock.getsockname())
            value = await asyncio.wait_for(result, 5)
            w.close()
            server.close()
            return value

        assert asyncio.run(accepted_nodelay()) == 1
    finally:
        sock.close()

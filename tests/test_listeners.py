"""Where the router listens: the Unix socket with its mode and group, and optional
loopback TCP. Who may connect is checked for real, by connecting from a process that has
dropped to another uid (`connect_as`, also used by tests/test_security.py)."""

from __future__ import annotations

import functools
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx
import pytest

from tests.harness import Suite, write_config

# A uid and gid no account here has: a caller that is neither root nor in any group.
OUTSIDER = 65533

# Run as another uid, with only the standard library (the venv's interpreter may sit
# under /root, which that uid cannot enter). "connect PATH...": what connect() says for
# each; "http PATH": stdin sent over the socket, the reply (until it closes) to stdout.
PROBE = r"""
import errno, json, socket, sys
mode, paths = sys.argv[1], sys.argv[2:]
if mode == "connect":
    out = {}
    for path in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            out[path] = "connected"
        except OSError as exc:
            out[path] = errno.errorcode.get(exc.errno, str(exc.errno))
        finally:
            s.close()
    print(json.dumps(out))
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(paths[0])
    s.sendall(sys.stdin.buffer.read())
    while True:
        data = s.recv(65536)
        if not data:
            break
        sys.stdout.buffer.write(data)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def probe_python() -> str | None:
    """An interpreter OUTSIDER can run, or None."""
    for exe in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if not exe:
            continue
        try:
            r = subprocess.run([exe, "-I", "-c", "pass"], user=OUTSIDER, group=OUTSIDER, extra_groups=[],
                               cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=60)
        except OSError:
            continue
        if r.returncode == 0:
            return exe
    return None


def as_user(args: Sequence[str], groups: Iterable[int] = (), uid: int = OUTSIDER, gid: int = OUTSIDER,
            stdin: bytes = b"") -> bytes:
    """Run PROBE as `uid`:`gid` with exactly the supplementary `groups`; its stdout."""
    if os.geteuid() != 0:
        pytest.skip("running a probe as another uid needs root")
    exe = probe_python()
    if exe is None:
        pytest.skip(f"no Python interpreter that uid {OUTSIDER} may run")
    r = subprocess.run([exe, "-I", "-c", PROBE, *args], input=stdin, user=uid, group=gid, extra_groups=list(groups),
                       cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=150)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


def connect_as(paths: Sequence[Path], groups: Iterable[int] = ()) -> dict[str, str]:
    """What connect() says to OUTSIDER (in `groups`) for each path: "connected" or an errno name."""
    out: dict[str, str] = json.loads(as_user(["connect", *map(str, paths)], groups))
    return {Path(p).name: v for p, v in out.items()}


def other_group() -> grp.struct_group | None:
    """A group this process's primary group is not: onebox where it exists."""
    for name in ("onebox", "nogroup", "users"):
        try:
            g = grp.getgrnam(name)
        except KeyError:
            continue
        if g.gr_gid != os.getegid():
            return g
    return None


def test_socket_modes_and_tcp(fresh_dir: Path) -> None:
    port = free_port()
    group = other_group()
    extra = f'[router]\ntcp = "127.0.0.1:{port}"\nsocket_mode = "0640"\n'
    config = write_config(fresh_dir, extra=extra + (f'socket_group = "{group.gr_name}"\n' if group else ""))
    fresh_dir.chmod(0o755)  # so that only the sockets' own modes stand in a probe's way
    suite = Suite(fresh_dir, config)
    try:
        router = suite.start_router()
        assert f"http://127.0.0.1:{port}" in router.ready_status, router.ready_status
        api_sock = (fresh_dir / "run" / "api.sock").stat()
        assert stat.S_IMODE(api_sock.st_mode) == 0o640
        assert stat.S_IMODE((fresh_dir / "run" / "bus.sock").stat().st_mode) == 0o600
        if group is not None:
            assert api_sock.st_gid == group.gr_gid
            if os.geteuid() == 0 and probe_python():
                # Connecting takes write permission: with 0640 not even the group may.
                got = connect_as([fresh_dir / "run" / "api.sock"], groups=[group.gr_gid])
                assert got == {"api.sock": "EACCES"}, got
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

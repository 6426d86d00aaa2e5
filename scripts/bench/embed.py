#!/usr/bin/env python3
"""onebox's embedding daemon vs a bare llama.cpp loop vs llama-cpp-python, same GGUF, same threads.

Starts onebox (the router and `onebox embed minilm` on all-MiniLM-L6-v2 with its
default config: batches of up to 64 inputs / 2048 tokens, batch_wait_ms 2.0; log level
info) in a temp dir and drives POST /v1/embeddings over the Unix socket api.sock
(--tcp: loopback TCP instead) from one asyncio loop of httpx clients, each with its own
keep-alive connection. In (1), (8) and (32) every client sends requests of one input, a
sentence of 10-40 words from a fixed list of 48 varied ones, back to back for --seconds:

  (1)   1 client                 embeddings/s, request latency p50/p99
  (8)   8 clients at once        the same
  (32)  32 clients at once       the same: onebox batching inputs across requests
  (32b) 32 clients, encoding_format "base64": the same load without the router writing
        384 floats per vector as JSON text, to show what that costs
  (256) one request of 256 inputs, --repeats times in a row: latency and inputs/s from
        the median; then the same as base64

For each it also reports the CPU the client, the router and the embedding daemon used
per input, the engine's own count of batches, mean batch and share of the time spent
in llama_decode (GET /v1/status), and how busy other processes kept the machine.

Then onebox is stopped and the same work runs in this process, with no server:

  bare loop         daemons.embed.native.EmbedModel/EmbedContext as the daemon makes
                    them (64 sequences, 2048 tokens): tokenize, one llama_decode, the
                    pooled normalised vectors, per batch; batches of 1, 8 and 32 inputs
                    in the clients' order (the 1-, 8- and 32-client cases) and the 256
                    inputs in batches of up to 64 inputs / 2048 tokens, the daemon's
                    plan: the ceiling for this llama.cpp build on this machine
  llama-cpp-python  Llama(path, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                    n_threads=T, n_threads_batch=T) and Llama.embed(..., normalize=True)
                    as a user calls it: one text per call (the 1-client case) and one
                    call with the list of 256

It checks that the three give the same vectors (cosine >= 0.999 on 6 inputs), prints
a table, onebox's efficiency (its inputs/s at 32 clients over the bare loop's with
batches of 32; target >= 0.8) and, as the last line, one JSON object with every
figure. Everything here is CPU-bound and the client shares the cores with the daemons:
run it on a quiet machine. It says which scenario other processes disturbed most
(more than 0.15 cores busy elsewhere: rerun). A full run takes about 2 minutes.

Usage: .venv/bin/python scripts/bench/embed.py [--quick] [--threads N] [--seconds S]
       [--repeats N] [--tcp] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"
NAME = "minilm"
SERVICE = f"embed/{NAME}"
BIG = 256
CONCURRENCY = (1, 8, 32)
TARGET_EFFICIENCY = 0.8
TARGET_COSINE = 0.999
BUSY_CORES = 0.15  # other processes busier than this during a scenario: its figures are not this code's

# What a search or RAG app embeds: questions, notes, log lines, product text; 10-40 words each.
SENTENCES = [
    "How do I reset my password if I no longer have access to the email address on my account?",
    "The quarterly report shows revenue grew by twelve percent, driven mostly by subscriptions in Europe.",
    "Preheat the oven to 180 degrees, grease a round tin and beat the butter with the sugar until pale.",
    "Our office is closed on public holidays; support tickets opened then are answered the next working day.",
    "The patient reported mild headaches in the mornings and was advised to keep a sleep diary for two weeks.",
    "Kubernetes restarts a container when its liveness probe fails three times in a row.",
    "She walked along the harbour at dusk, watching the fishing boats come in one after another.",
    "Error: connection refused while connecting to the database on port 5432; is the server running?",
    "Please find attached the signed contract together with the invoice for the first instalment.",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product.",
    "The train to Lyon leaves from platform four at 9:42 and stops at Dijon and Mâcon.",
    "Customers who bought this cordless drill also bought a set of titanium bits and a spare battery.",
    "Is it safe to run the dishwasher and the washing machine at the same time on an old circuit?",
    "The committee postponed its decision on the new cycling lanes until residents have been consulted again.",
    "A binary search halves the interval at every step, so it needs about log2(n) comparisons.",
    "Remember to water the tomatoes every evening during the heatwave and to pinch out the side shoots.",
    "The museum's new wing displays ceramics from the Song dynasty alongside contemporary Japanese pottery.",
    "Refunds are issued to the original payment method within five working days of receiving the returned item.",
    "Migrating birds use the Earth's magnetic field, the position of the sun and the stars to find their way.",
    "Can I bring my dog on the ferry, and does it need to stay in the car during the crossing?",
    "The new firmware fixes a bug that drained the battery when Bluetooth was left on overnight.",
    "Interest rates were held steady this month, but the central bank signalled a possible cut in the autumn.",
    "He learned to play the violin at the age of forty and now performs with a local amateur orchestra.",
    "To enable two-factor authentication, open Settings, choose Security, and scan the QR code with your app.",
    "The landslide closed the mountain road for three days, cutting off several villages from the valley.",
    "Add a unit test that reproduces the race condition before changing the locking in the cache.",
    "Our team meets every Tuesday at ten to review the backlog and plan the next sprint's work.",
    "The hotel offers free parking, a heated indoor pool and breakfast served from seven until half past ten.",
    "Glaciers in the Alps have lost more than half of their volume since the middle of the last century.",
    "What is the difference between a Roth IRA and a traditional IRA when it comes to taxes on withdrawals?",
    "The printer on the third floor jams whenever someone uses the thick recycled paper from the supply room.",
    "Volunteers collected over two tonnes of plastic from the beach during the weekend clean-up.",
    "A sourdough starter needs regular feeding with flour and water, and it smells slightly sour when active.",
    "The lease may be terminated by either party with three months' written notice, except during the first year.",
    "Low-latency trading systems avoid garbage collection pauses by preallocating memory and reusing objects.",
    "My laptop fan is very loud even when nothing is running; could a background update be the cause?",
    "The documentary follows a family of elephants across the savannah during an unusually long dry season.",
    "Shipping to Norway and Switzerland takes longer because parcels must clear customs on arrival.",
    "The function returns None when the key is missing instead of raising KeyError, which hides bugs.",
    "Children under twelve travel free on weekends when accompanied by an adult holding a valid ticket.",
    "The study found no link between moderate coffee drinking and heart disease in adults under sixty.",
    "Wind turbines are shut down automatically when gusts exceed ninety kilometres per hour to protect the blades.",
    "Thank you for your order! Your package has been dispatched and should arrive within two to four days.",
    "The novel is set in a small fishing town in Portugal, where a lighthouse keeper guards an old secret.",
    "Use a torque wrench to tighten the wheel nuts in a star pattern to the value given in the manual.",
    "Backups run every night at two, and snapshots older than thirty days are deleted automatically.",
    "The choir is looking for tenors and basses; rehearsals are on Thursday evenings in the parish hall.",
    "Quantum computers use qubits, which can be in a superposition of states, to explore many possibilities at once.",
]
assert all(10 <= len(s.split()) <= 40 for s in SENTENCES), [s for s in SENTENCES if not 10 <= len(s.split()) <= 40]
CHECK = [0, 7, 10, 14, 33, 47]  # the inputs whose vectors are compared across the three
HEADERS = {"content-type": "application/json"}


def sentence(client: int, k: int, clients: int) -> str:
    """What client `client` sends as its k-th request; over a run every sentence is sent
    about equally often, so the bare loop's stream (the list cycled) is the same work."""
    return SENTENCES[(client + k * clients) % len(SENTENCES)]


def big_inputs() -> list[str]:
    return [SENTENCES[i % len(SENTENCES)] for i in range(BIG)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every core)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Meter:
    """CPU used while a scenario runs: this process (the client or the in-process loop),
    the daemons, and everything else on the machine (another user's jobs), in cores."""

    def __init__(self, pids: dict[str, int] | None = None) -> None:
        self.pids = pids or {}

    def __enter__(self) -> Self:
        self.t0, self.own0, self.busy0 = time.perf_counter(), time.process_time(), busy_s()
        self.p0 = {k: cpu_s(p) for k, p in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.own = time.process_time() - self.own0
        self.procs = {k: cpu_s(p) - self.p0[k] for k, p in self.pids.items()}
        self.others = max(0.0, busy_s() - self.busy0 - self.own - sum(self.procs.values()))

    def report(self, inputs: int) -> dict[str, Any]:
        per = {("client" if self.pids else "loop"): self.own, **self.procs}
        return {"cpu_ms_per_input": {k: round(v * 1000 / max(inputs, 1), 3) for k, v in per.items()},
                "other_cores": round(self.others / self.wall, 2) if self.wall else 0.0}


def cosine(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- onebox ------------------------------------------------------------------------------


class Onebox:
    def __init__(self, directory: Path, threads: int, tcp: bool, extra: dict[str, Any]) -> None:
        from daemons import config, registry
        from daemons.ctl.launcher import Suite

        table = {"path": MODEL, "threads": threads, **extra}
        lines = ["[paths]", f'runtime_dir = "{directory}/run"', f'state_dir = "{directory}/state"',
                 "[log]", 'level = "info"']
        self.port = free_port() if tcp else 0
        if tcp:
            lines += ["[router]", f'tcp = "127.0.0.1:{self.port}"']
        lines += ["[ocr]", "enabled = false"]  # on by default; this bench runs the router and embed@minilm only
        lines.append(f"[embeddings.{NAME}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
        cfg = directory / "onebox.toml"
        cfg.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONEBOX") and k != "NOTIFY_SOCKET"}
        self.suite = Suite(cfg, env, directory / "run", log_dir=directory)
        self.config = config.load(cfg, env)
        try:
            self.suite.start_all(registry.instances(self.config), wait=180)
            self.suite.wait_for(lambda c: c.get("/ready").json()["services"].get(SERVICE) == 1, 30,
                                "the embed worker to register")
        except BaseException:
            self.stop()  # a daemon that failed to start leaves none behind
            raise
        self.pid = self.suite.children[f"embed@{NAME}"].pid
        self.router_pid = self.suite.children["router"].pid
        self.sent = 0  # requests answered 200 so far (each one FINAL the engine counts as served)

    def transport(self, clients: int) -> Any:
        """httpx's async transport with a keep-alive connection per client."""
        import httpx

        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        if self.port:
            return httpx.AsyncHTTPTransport(limits=limits)
        return httpx.AsyncHTTPTransport(uds=str(self.suite.api_socket), limits=limits)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/embeddings" if self.port else "http://onebox/v1/embeddings"

    def engine_status(self) -> dict[str, Any]:
        """The engine's counters once they include every request answered so far (status
        comes with heartbeats, so up to one interval late)."""

        def done(b: dict[str, Any]) -> bool:
            w = b["services"][SERVICE]["workers"][0]
            return bool(w["served"] >= self.sent and w["in_flight"] == 0)

        body = self.suite.wait_status(done, timeout=10, what="the embed engine's counters after the load")
        return dict(body["services"][SERVICE]["workers"][0])

    def meter(self) -> Meter:
        return Meter({"router": self.router_pid, "embed": self.pid})

    def stop(self) -> None:
        self.suite.stop(15)


# The client: one asyncio loop; one httpx.AsyncHTTPTransport (httpx's own transport,
# called directly: httpx.AsyncClient.post adds URL merging, cookies, hooks and auth,
# about 0.15 ms more per request here) with a keep-alive connection per simulated
# client; request bodies encoded once; responses read whole and checked by status code,
# not parsed (json.loads of one float vector is ~0.07 ms more). Measured on this 2-core
# box it costs about 0.45 ms of CPU per one-input request (0.6 ms with AsyncClient.post,
# 0.75 ms with one sync httpx.Client per thread); the table's "client" column reports it
# for every run. It shares the cores with the router and llama.cpp, so its cost counts
# against onebox, as a real local app's would; it is not subtracted.
async def post(transport: Any, url: str, body: bytes | None) -> tuple[int, int]:
    """POST `body` to `url` (None: GET /health there, to open a connection)."""
    import httpx

    request = (httpx.Request("POST", url, content=body, headers=HEADERS) if body is not None
               else httpx.Request("GET", url.replace("/v1/embeddings", "/health")))
    r = await transport.handle_async_request(request)
    try:
        return r.status_code, len(await r.aread())
    finally:
        await r.aclose()


async def closed_loop(box: Onebox, clients: int, seconds: float, encoding: str) -> dict[str, Any]:
    import httpx

    bodies = [json.dumps({"model": NAME, "input": s, "encoding_format": encoding}).encode() for s in SENTENCES]
    index = {s: i for i, s in enumerate(SENTENCES)}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    transport = box.transport(clients)
    try:
        # Open every connection first, so the run does not time connection set-up.
        await asyncio.gather(*(post(transport, box.url, None) for _ in range(clients)))
        start = time.perf_counter()
        deadline = start + seconds

        async def one(c: int) -> None:
            k = 0
            while time.perf_counter() < deadline:
                body = bodies[index[sentence(c, k, clients)]]
                t0 = time.perf_counter()
                try:
                    status, _ = await post(transport, box.url, body)
                    if status == 200:
                        latencies.append(time.perf_counter() - t0)
                        box.sent += 1
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                except (httpx.HTTPError, OSError) as exc:  # a reset connection, a timeout: count it
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                k += 1

        with box.meter() as meter:
            await asyncio.gather(*(one(c) for c in range(clients)))
            wall = time.perf_counter() - start
    finally:
        await transport.aclose()
    n = len(latencies)
    return {"clients": clients, "encoding": encoding, "requests": n, "inputs": n, "errors": errors,
            "wall_s": round(wall, 2), "inputs_per_s": round(n / wall, 1),
            "p50_ms": round(pct(latencies, 50) * 1000, 2), "p99_ms": round(pct(latencies, 99) * 1000, 2),
            **meter.report(n)}


async def big_request(box: Onebox, repeats: int, encoding: str) -> dict[str, Any]:
    body = json.dumps({"model": NAME, "input": big_inputs(), "encoding_format": encoding}).encode()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    size = 0
    transport = box.transport(1)
    try:
        await post(transport, box.url, None)
        with box.meter() as meter:
            for _ in range(repeats):
                t0 = time.perf_counter()
                status, size = await post(transport, box.url, body)
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                    box.sent += 1
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
    finally:
        await transport.aclose()
    n = len(latencies) * BIG
    p50 = pct(latencies, 50)
    return {"inputs_per_request": BIG, "encoding": encoding, "requests": len(latencies), "inputs": n,
            "errors": errors, "wall_s": round(sum(latencies), 2), "inputs_per_s": round(BIG / p50, 1) if p50 else 0.0,
            "p50_ms": round(p50 * 1000, 1), "p99_ms": round(pct(latencies, 99) * 1000, 1), "response_bytes": size,
            **meter.report(n)}


def engine_delta(before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, Any]:
    batches = after["batches"] - before["batches"]
    embedded = after["embedded"] - before["embedded"]
    decode = after["decode_s"] - before["decode_s"]
    return {"batches": batches, "mean_batch": round(embedded / batches, 1) if batches else 0.0,
            "decode_s": round(decode, 2), "decode_share": round(decode / wall, 3) if wall else 0.0}


def onebox_vectors(box: Onebox) -> list[list[float]]:
    """The CHECK inputs, each as its own request (as the clients send them)."""
    with box.suite.client() as c:
        out = []
        for i in CHECK:
            r = c.post("/v1/embeddings", json={"model": NAME, "input": SENTENCES[i]})
            r.raise_for_status()
            box.sent += 1
            out.append(r.json()["data"][0]["embedding"])
        return out


def run_onebox(directory: Path, args: argparse.Namespace, extra: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    box = Onebox(directory, args.threads, args.tcp, extra)
    print(f"onebox: {', '.join(f'{n} pid {c.pid}' for n, c in box.suite.children.items())}, over "
          f"{f'TCP 127.0.0.1:{box.port}' if box.port else box.suite.api_socket.name}", flush=True)
    results: dict[str, Any] = {}
    try:
        vectors = onebox_vectors(box)
        # Warm-up: a second of 8 clients and one big request.
        asyncio.run(closed_loop(box, 8, 1.0, "float"))
        asyncio.run(big_request(box, 1, "float"))
        before = box.engine_status()
        plan: list[tuple[str, Any]] = [(f"c{n}", (n, "float")) for n in CONCURRENCY]
        plan.append(("c32_base64", (32, "base64")))
        for label, (n, enc) in plan:
            print(f"onebox {label}: {n} client(s), {enc}, {args.seconds:g} s ...", flush=True)
            res = asyncio.run(closed_loop(box, n, args.seconds, enc))
            after = box.engine_status()
            res["engine"] = engine_delta(before, after, res["wall_s"])
            before = after
            results[label] = res
        for label, enc in (("big", "float"), ("big_base64", "base64")):
            repeats = args.repeats
            print(f"onebox {label}: one request of {BIG} inputs, {enc}, x{repeats} ...", flush=True)
            res = asyncio.run(big_request(box, repeats, enc))
            after = box.engine_status()
            res["engine"] = engine_delta(before, after, res["wall_s"])
            before = after
            results[label] = res
        results["peak_rss_mib"] = {"router": peak_rss_mib(box.router_pid), "embed": peak_rss_mib(box.pid)}
    finally:
        box.stop()
    return results, vectors


def peak_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# -- the bare loop -------------------------------------------------------------------------


def daemon_plan(tokens: list[list[int]], max_inputs: int, max_tokens: int) -> list[list[list[int]]]:
    """Inputs in order, as many per batch as fit (the daemon's plan for one request)."""
    batches: list[list[list[int]]] = []
    cur: list[list[int]] = []
    n = 0
    for t in tokens:
        if cur and (len(cur) >= max_inputs or n + len(t) > max_tokens):
            batches.append(cur)
            cur, n = [], 0
        cur.append(t)
        n += len(t)
    if cur:
        batches.append(cur)
    return batches


def timed_loop(work: Any, per_call: int, seconds: float) -> dict[str, Any]:
    """Call work(k) back to back for `seconds`; each call embeds `per_call` inputs."""
    times: list[float] = []
    with Meter() as meter:
        deadline = time.perf_counter() + seconds
        k = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            work(k)
            times.append(time.perf_counter() - t0)
            k += 1
    inputs = len(times) * per_call
    return {"inputs": inputs, "wall_s": round(meter.wall, 2), "inputs_per_s": round(inputs / meter.wall, 1),
            "p50_ms": round(pct(times, 50) * 1000, 2), "p99_ms": round(pct(times, 99) * 1000, 2),
            **meter.report(inputs)}


def timed_repeats(work: Any, repeats: int) -> dict[str, Any]:
    """work() `repeats` times; inputs/s from the median, as for onebox's big request."""
    times: list[float] = []
    with Meter() as meter:
        for _ in range(repeats):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
    p50 = pct(times, 50)
    return {"inputs_per_request": BIG, "inputs": BIG * repeats, "wall_s": round(meter.wall, 2),
            "inputs_per_s": round(BIG / p50, 1), "p50_ms": round(p50 * 1000, 1),
            "p99_ms": round(pct(times, 99) * 1000, 1), **meter.report(BIG * repeats)}


def run_bare(model_path: Path, args: argparse.Namespace, ec: Any) -> tuple[dict[str, Any], list[Any]]:
    """The daemon's own llama.cpp context, driven by a plain loop in this process:
    tokenize, one llama_decode per batch, pooled and normalised vectors. No server."""
    from daemons.embed.native import EmbedContext, EmbedModel
    from daemons.llama import forward_llama_logs

    forward_llama_logs()
    model = EmbedModel(model_path)
    ctx = EmbedContext(model, n_tokens=max(ec.batch_tokens, model.n_ctx_train or 0), n_seqs=ec.batch_inputs,
                       threads=args.threads)
    results: dict[str, Any] = {}
    try:
        vectors = [ctx.embed([model.tokenize(SENTENCES[i])], True)[0].tolist() for i in CHECK]
        for k in range(20):  # warm-up
            ctx.embed([model.tokenize(SENTENCES[(8 * k + j) % len(SENTENCES)]) for j in range(8)], True)
        for n in CONCURRENCY:
            print(f"bare loop c{n}: batches of {n}, {args.seconds:g} s ...", flush=True)

            def batch(k: int, n: int = n) -> None:  # the list cycled, n at a time
                ctx.embed([model.tokenize(SENTENCES[(k * n + j) % len(SENTENCES)]) for j in range(n)], True)

            results[f"c{n}"] = {"batch": n, **timed_loop(batch, n, args.seconds)}
        plan = daemon_plan([model.tokenize(s) for s in big_inputs()], ec.batch_inputs, ctx.n_tokens)
        print(f"bare loop big: {BIG} inputs in batches of up to {ec.batch_inputs} inputs / {ctx.n_tokens} tokens "
              f"({len(plan)} batches), x{args.repeats} ...", flush=True)

        def big() -> None:
            for b in daemon_plan([model.tokenize(s) for s in big_inputs()], ec.batch_inputs, ctx.n_tokens):
                ctx.embed(b, True)

        results["big"] = {"batches": [len(b) for b in plan], **timed_repeats(big, args.repeats)}
    finally:
        ctx.close()
    return results, vectors


# -- llama-cpp-python ------------------------------------------------------------------------


def run_llama_cpp_python(model_path: Path, args: argparse.Namespace) -> tuple[dict[str, Any], list[Any]]:
    import llama_cpp

    # n_threads_batch too: left out it defaults to every core, and these are prompt-sized batches.
    llm = llama_cpp.Llama(str(model_path), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    results: dict[str, Any] = {}
    try:
        vectors = [llm.embed(SENTENCES[i], normalize=True) for i in CHECK]
        for s in SENTENCES[:20]:  # warm-up
            llm.embed(s, normalize=True)
        print(f"llama-cpp-python c1: Llama.embed(text), {args.seconds:g} s ...", flush=True)
        results["c1"] = timed_loop(lambda k: llm.embed(SENTENCES[k % len(SENTENCES)], normalize=True), 1,
                                   args.seconds)
        print(f"llama-cpp-python big: Llama.embed(list of {BIG}), x{args.repeats} ...", flush=True)
        texts = big_inputs()
        results["big"] = timed_repeats(lambda: llm.embed(texts, normalize=True), args.repeats)
    finally:
        llm.close()
    return results, vectors


# -- main ------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    ob, bare, lcp = results.get("onebox", {}), results.get("bare_loop", {}), results.get("llama_cpp_python", {})
    head = (f"{'scenario':24s} {'system':17s} {'inputs':>6s} {'inputs/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
            f"{'errors':>6s} {'batches':>7s} {'mean':>5s} {'decode':>6s} {'others':>6s}  CPU ms/input")
    lines = [head, "-" * (len(head) + 26)]

    def row(scenario: str, system: str, r: dict[str, Any] | None) -> None:
        if not r:
            return
        errs = sum(r.get("errors", {}).values())
        eng = r.get("engine")
        e = (f"{eng['batches']:7d} {eng['mean_batch']:5.1f} {eng['decode_share'] * 100:5.0f}%" if eng
             else f"{'':7s} {'':5s} {'':6s}")
        cpu = " ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_input"].items())
        lines.append(f"{scenario:24s} {system:17s} {r['inputs']:6d} {r['inputs_per_s']:8.1f} {r['p50_ms']:8.2f} "
                     f"{r['p99_ms']:8.2f} {errs:6d} {e} {r['other_cores']:6.2f}  {cpu}")

    for n in CONCURRENCY:
        label = f"c{n}"
        scen = f"{n} client{'s' if n > 1 else ''} x 1 input"
        row(scen, "onebox", ob.get(label))
        row(scen, f"bare (batch {n})", bare.get(label))
        row(scen, "llama-cpp-python", lcp.get(label))
    row("32 clients, base64", "onebox", ob.get("c32_base64"))
    row(f"1 request x {BIG} inputs", "onebox", ob.get("big"))
    row(f"1 request x {BIG}, base64", "onebox", ob.get("big_base64"))
    row(f"1 request x {BIG} inputs", "bare (64/2048)", bare.get("big"))
    row(f"1 request x {BIG} inputs", "llama-cpp-python", lcp.get("big"))
    lines.append("(p50/p99: per request for onebox and llama-cpp-python, per batch for the bare loop; batches, "
                 "mean (inputs per batch) and decode (share of the wall time in llama_decode): the engine's own "
                 "counters; others: cores busy with other processes meanwhile; CPU per input: client or loop = "
                 "this process)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads for all three (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s per scenario, 2 big requests")
    parser.add_argument("--seconds", type=float, help="seconds per client scenario and bare loop (default 8; "
                                                      "--quick 2)")
    parser.add_argument("--repeats", type=int, help=f"how many {BIG}-input requests in a row (default 5; --quick 2)")
    parser.add_argument("--tcp", action="store_true", help="reach the router over loopback TCP, not api.sock")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"extra [embeddings.{NAME}] config key for onebox (TOML value), e.g. "
                             "--set batch_wait_ms=0; the bare loop uses batch_inputs/batch_tokens too")
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 8.0)
    args.repeats = args.repeats or (2 if args.quick else 5)
    # SIGTERM (e.g. from `timeout`) unwinds, so the daemons are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from daemons import config as config_mod
    from daemons.config import EmbeddingConfig
    from daemons.models import resolve

    model_path = resolve(MODEL, ROOT / "var" / "lib" / "models")
    extra: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = config_mod.parse_env_value(value)  # a TOML value when it parses, else a string
    ec = EmbeddingConfig(path=MODEL, threads=args.threads,
                         **{k: v for k, v in extra.items() if k in EmbeddingConfig.__dataclass_fields__})
    load_before = os.getloadavg()
    print(f"model {model_path.name}, {args.threads} threads, {len(SENTENCES)} sentences of 10-40 words, "
          f"{args.seconds:g} s per scenario, {args.repeats} x {BIG}-input request; batch {ec.batch_inputs} inputs / "
          f"{ec.batch_tokens} tokens, batch_wait_ms {ec.batch_wait_ms:g}; {os.cpu_count()} CPUs, "
          f"load before {tuple(round(x, 2) for x in load_before)}", flush=True)
    started = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="onebox-bench-embed-") as d:
        results["onebox"], v_onebox = run_onebox(Path(d), args, extra)
    results["bare_loop"], v_bare = run_bare(model_path, args, ec)
    results["llama_cpp_python"], v_lcp = run_llama_cpp_python(model_path, args)

    print()
    for line in table(results):
        print(line)

    agree = {"onebox_vs_bare": round(min(cosine(a, b) for a, b in zip(v_onebox, v_bare)), 6),
             "llama_cpp_python_vs_bare": round(min(cosine(a, b) for a, b in zip(v_lcp, v_bare)), 6),
             "onebox_vs_llama_cpp_python": round(min(cosine(a, b) for a, b in zip(v_onebox, v_lcp)), 6)}
    agree_ok = all(v >= TARGET_COSINE for v in agree.values())
    print(f"\nvectors agree on {len(CHECK)} inputs (min cosine): " +
          ", ".join(f"{k} {v:.6f}" for k, v in agree.items()) + f" -> {'yes' if agree_ok else 'NO'}")

    ob, bare, lcp = results["onebox"], results["bare_loop"], results["llama_cpp_python"]
    eff = {f"c{n}": round(ob[f"c{n}"]["inputs_per_s"] / bare[f"c{n}"]["inputs_per_s"], 3) for n in CONCURRENCY}
    eff["big"] = round(ob["big"]["inputs_per_s"] / bare["big"]["inputs_per_s"], 3)
    eff32 = eff["c32"]
    others = {f"{system}/{label}": r["other_cores"] for system, rs in results.items() for label, r in rs.items()
              if isinstance(r, dict) and "other_cores" in r}
    disturbed = sorted(k for k, v in others.items() if v > BUSY_CORES)
    # The verdict stands only if neither side of it shared the machine with another job.
    judged = not {"onebox/c32", "bare_loop/c32"} & set(disturbed)
    print(f"efficiency: onebox 32 clients {ob['c32']['inputs_per_s']:.1f} inputs/s / bare loop (batches of 32) "
          f"{bare['c32']['inputs_per_s']:.1f} inputs/s = {eff32:.2f} (target >= {TARGET_EFFICIENCY}: "
          f"{('yes' if eff32 >= TARGET_EFFICIENCY else 'NO') if judged else 'not judged, another job was running'})")
    print("  at 1 / 8 clients: {:.2f} / {:.2f}; {}-input request: {:.2f}; 32 clients with base64: {:.2f}".format(
        eff["c1"], eff["c8"], BIG, eff["big"], ob["c32_base64"]["inputs_per_s"] / bare["c32"]["inputs_per_s"]))
    vs_lcp = {"c1": round(ob["c1"]["inputs_per_s"] / lcp["c1"]["inputs_per_s"], 2),
              "c32_over_lcp_c1": round(ob["c32"]["inputs_per_s"] / lcp["c1"]["inputs_per_s"], 2),
              "big": round(ob["big"]["inputs_per_s"] / lcp["big"]["inputs_per_s"], 2)}
    print(f"onebox / llama-cpp-python: 1 client x{vs_lcp['c1']:.2f}, 32 clients over its one-at-a-time "
          f"x{vs_lcp['c32_over_lcp_c1']:.2f}, {BIG}-input request x{vs_lcp['big']:.2f}")
    load_after = os.getloadavg()
    worst = max(others, key=lambda k: others[k])
    print(f"load before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}; "
          f"other processes used at most {others[worst]:.2f} cores ({worst})"
          + (f"; disturbed (> {BUSY_CORES} cores elsewhere), rerun on a quiet machine: {', '.join(disturbed)}"
             if disturbed else "") + f"; took {time.monotonic() - started:.0f} s")
    summary = {"model": model_path.name, "threads": args.threads, "seconds": args.seconds, "repeats": args.repeats,
               "transport": "tcp" if args.tcp else "unix", "config": {k: getattr(ec, k) for k in
                                                                       ("batch_inputs", "batch_tokens", "batch_wait_ms")},
               "cpus": os.cpu_count(), "other_cores_max": others[worst], "disturbed": disturbed, "load_before": [round(x, 2) for x in load_before],
               "load_after": [round(x, 2) for x in load_after], "results": results, "vectors_min_cosine": agree,
               "efficiency": eff, "onebox_over_llama_cpp_python": vs_lcp,
               "targets": {"efficiency_c32_ge_0.8": (eff32 >= TARGET_EFFICIENCY) if judged else None,
                           "vectors_cosine_ge_0.999": agree_ok}}
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

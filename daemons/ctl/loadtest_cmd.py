"""`onebox loadtest`: the 26th-user test. Simulated users (one keep-alive client each,
streamed chat completions in a closed loop) against the running suite, ramped up
1, 2, 4 ... N; per step TTFT, inter-token and end-to-end latency p50/p99, tokens/s and
errors by kind; the step where it broke; optionally JSON and a PNG chart.
The measuring is in daemons/loadtest/; this is the command line, the target and output."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from daemons.config import Config, ConfigError
from daemons.ctl import api
from daemons.ctl.api import APIError, Endpoint
from daemons.loadtest import report
from daemons.loadtest.runner import Plan, Ramp
from daemons.loadtest.stats import Step, Targets, steps_for
from daemons.loadtest.target import chat_models
from daemons.loadtest.users import CONNECTION, ClientFactory, Outcome
from daemons.loadtest.workload import DEFAULT_CONTEXT, DEFAULT_WEIGHTS, MIXES, Shape, UsageError, Workload, \
    parse_weights

PROG = "onebox loadtest"
EX_BROKE = 1
EX_USAGE = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=("Ramp simulated users up against the router (1, 2, 4 ... N, each step --duration seconds; "
                     "each user sends a streamed chat completion, then the next when it ends) and report per step "
                     "TTFT, inter-token and end-to-end latency p50/p99, tokens/s and errors by kind, and the step "
                     "where it broke: the first with errors over --max-error-rate or a p99 over --p99-ttft / "
                     "--p99-e2e. Ctrl-C stops the current step and reports what it has."),
        epilog=("Exit status: 0 it did not break, 1 it broke (or the router refused to list models), 2 bad "
                "arguments, 69 the router cannot be reached, 78 config error, 130 interrupted (Ctrl-C)."),
    )
    p.add_argument("--users", type=int, default=26, metavar="N", help="users in the last step (default: 26)")
    p.add_argument("--duration", type=float, default=30.0, metavar="S", help="seconds each step sends (default: 30)")
    p.add_argument("--mix", choices=MIXES, default="chat",
                   help="chat: short prompts; rag: chat with the router's RAG (\"rag\": {}); long: a document of "
                        "about a quarter of the model's context; mixed: a weighted mix (default: chat)")
    p.add_argument("--weights", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_WEIGHTS.items()),
                   metavar="KIND=W,...", help="the mixed mix (default: %(default)s)")
    p.add_argument("--think", type=float, default=0.0, metavar="S",
                   help="each user waits a random 0..S seconds between requests (default: 0)")
    p.add_argument("--model", help="the chat model (default: the first chat model GET /v1/models lists)")
    p.add_argument("--prompt-tokens", type=int, default=20, metavar="N", help="chat prompt size (default: 20)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="max_tokens of every request (default: 64)")
    p.add_argument("--long-tokens", type=int, metavar="N",
                   help="long prompt size (default: a quarter of the model's context, from GET /v1/models or the "
                        f"config, else of {DEFAULT_CONTEXT})")
    p.add_argument("--collection", help="rag: the [collections.NAME] to answer from (default: all of them)")
    p.add_argument("--max-error-rate", type=float, default=0.0, metavar="F",
                   help="a step with more errors than this fraction broke (default: 0, any error)")
    p.add_argument("--p99-ttft", type=float, metavar="S", help="a step whose p99 time to first token is over S broke")
    p.add_argument("--p99-e2e", type=float, metavar="S", help="a step whose p99 end-to-end latency is over S broke")
    p.add_argument("--stop-at-break", action="store_true", help="do not run the steps after the one that broke")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="a request's deadline, sent as X-Request-Timeout (default: 300)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="requests sent, and not counted, before the first step (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="for the prompts and think times (default: 0)")
    p.add_argument("--json", metavar="F", help="write every figure as JSON to F ('-': as the last line of stdout)")
    p.add_argument("--plot", type=Path, metavar="F.png", help="write a chart of latency and tokens/s against users")
    p.add_argument("--api-key-file", type=Path, metavar="F",
                   help="the API key for the router (default: $ONEBOX_API_KEY); needed over TCP")
    api.add_arguments(p)
    return p


def check(args: argparse.Namespace) -> None:
    for name, value, low in (("--users", args.users, 1), ("--prompt-tokens", args.prompt_tokens, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--long-tokens", args.long_tokens, 16),
                             ("--warmup", args.warmup, 0)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be at least {low}")
    for name, value in (("--duration", args.duration), ("--timeout", args.timeout), ("--p99-ttft", args.p99_ttft),
                        ("--p99-e2e", args.p99_e2e)):
        if value is not None and not value > 0:
            raise UsageError(f"{name} must be above 0")
    if args.think < 0:
        raise UsageError("--think must not be negative")
    if not 0 <= args.max_error_rate <= 1:
        raise UsageError("--max-error-rate is a fraction, 0 to 1 (0.01 is 1%)")
    for name, out in (("--json", None if args.json in (None, "-") else Path(args.json)), ("--plot", args.plot)):
        if out is not None and not out.parent.is_dir():
            raise UsageError(f"{name}: no folder {out.parent}")  # now, not after the whole run


def api_key(path: Path | None) -> str | None:
    if path is None:
        return os.environ.get("ONEBOX_API_KEY") or None
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"--api-key-file: {exc.strerror or exc}: {path}") from None
    if not key:
        raise UsageError(f"--api-key-file: {path} is empty")
    return key


def client_factory(endpoint: Endpoint, key: str | None, timeout: float) -> ClientFactory:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # One connection a user, kept alive between its requests, as a real client's.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    # The read timeout is between chunks; the request's whole deadline is the user's.
    timeouts = httpx.Timeout(timeout + 10, connect=10.0)

    def make() -> httpx.AsyncClient:
        if endpoint.socket is not None:
            transport = httpx.AsyncHTTPTransport(uds=str(endpoint.socket), limits=limits)
            return httpx.AsyncClient(transport=transport, base_url="http://onebox", headers=headers,
                                     timeout=timeouts)
        return httpx.AsyncClient(base_url=str(endpoint.url), headers=headers, timeout=timeouts, limits=limits)

    return make


def config_context(config: Config | None, model: str) -> int | None:
    """The most tokens one request may use, by the config: min(n_ctx, kv_tokens) for the
    batch engine (its one KV pool bounds a request too), n_ctx for the simple one."""
    m = config.models.get(model) if config is not None else None
    if m is None:
        return None
    return min(m.n_ctx, m.kv_tokens) if m.engine == "batch" else m.n_ctx


def hint(key: str | None) -> report.Hint:
    """What to do about an error kind, where this command knows."""

    def of(kind: str) -> str | None:
        if kind.startswith("401"):
            return ("the router refused this API key" if key else
                    "the router wants an API key: --api-key-file F or $ONEBOX_API_KEY")
        if kind.startswith("403"):
            return "this principal may not use the model"
        if kind == "404 collection_not_found":
            return "--collection names no [collections.NAME] of the router"
        if kind.startswith("404"):
            return "no such model: see --model and GET /v1/models"
        if kind == "503 index_unavailable":
            return "the rag mix needs ingested documents: a [collections.NAME] and onebox-ingest"
        if kind == "503 no_embedding_model":
            return "RAG needs an [embeddings.NAME] model"
        if kind.startswith("429"):
            return "a limit of the principal, or the model's queue is full"
        if kind == CONNECTION:
            return "is onebox-router running?"
        return None

    return of


async def discover(make: ClientFactory, endpoint: Endpoint, wanted: str | None) -> tuple[str, int | None]:
    """(the model, its context length if listed). Without --model, a router that will
    not list its models ends the run (APIError): there is nothing to load."""
    async with make() as http:
        try:
            response = await http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise api.explain(exc, endpoint) from None
    if response.status_code >= 400:
        message = api.error_message(response)
        if wanted is None:
            raise APIError(message, response.status_code)
        print(f"{PROG}: warning: {message}", file=sys.stderr)
        return wanted, None
    try:
        listed = chat_models(response.json())
    except ValueError:
        listed = []
    if wanted is None:
        if not listed:
            raise APIError(f"GET /v1/models at {endpoint} lists no chat model; name one with --model")
        wanted = listed[0].id
    entry = next((m for m in listed if m.id == wanted), None)
    if entry is None:
        print(f"{PROG}: warning: GET /v1/models does not list {wanted!r}", file=sys.stderr)
    elif entry.ready is False:
        print(f"{PROG}: warning: {wanted!r} has no live worker now (its requests will get 503)", file=sys.stderr)
    return wanted, entry.context if entry is not None else None


class Progress:
    """The tqdm bar over the whole run (steps x duration seconds), a line a step."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.bar = tqdm(total=len(plan.steps) * plan.duration_s, unit="s", file=sys.stderr,
                        disable=not sys.stderr.isatty(), dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                   "[{elapsed}<{remaining}{postfix}]")

    def tick(self, index: int, seconds: float, outcomes: list[Outcome]) -> None:
        done = [o for o in outcomes if o.finished]
        errors = sum(1 for o in done if not o.ok)
        users = self.plan.steps[index]
        self.bar.set_description_str(f"{users} user(s)", refresh=False)
        draining = " draining" if seconds >= self.plan.duration_s else ""
        self.bar.set_postfix_str(f"{len(done)} req, {errors} err{draining}", refresh=False)
        self.bar.n = index * self.plan.duration_s + seconds
        self.bar.refresh()

    def step(self, index: int, s: Step) -> None:
        p99 = f", p99 TTFT {s.ttft_s.p99:.2f} s, p99 e2e {s.e2e_s.p99:.2f} s" if s.ttft_s and s.e2e_s else ""
        line = (f"step {index + 1}/{len(self.plan.steps)}: {s.users} user(s): {s.requests} requests, "
                f"{s.errors} errors, {s.tokens_per_s:.1f} tok/s{p99}" + (f"; broke: {s.broke}" if s.broke else ""))
        tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


async def run(ramp: Ramp, progress: Progress) -> int | None:
    """Run the ramp; the signal that stopped it, if one did. SIGINT and SIGTERM stop
    the current step (its data kept); a second one falls back to the default (abort)."""
    loop = asyncio.get_running_loop()
    stopped_by: list[int] = []

    def stop(signum: int) -> None:
        stopped_by.append(signum)
        ramp.stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        await ramp.run(progress.tick, progress.step)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        progress.close()
    return stopped_by[0] if stopped_by else None


def write_outputs(args: argparse.Namespace, doc: dict[str, Any], ramp: Ramp, title: str) -> bool:
    """--json and --plot; False when one could not be written (said why)."""
    ok = True
    if args.json and args.json != "-":
        try:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"wrote {args.json}")
        except OSError as exc:
            print(f"{PROG}: --json: {exc}", file=sys.stderr)
            ok = False
    if args.plot is not None and ramp.steps:
        from daemons.loadtest import chart

        try:
            chart.plot(args.plot, ramp.steps, ramp.broke_at, ramp.targets, title)
            print(f"wrote {args.plot}")
        except (OSError, ValueError) as exc:
            print(f"{PROG}: --plot: {exc}", file=sys.stderr)
            ok = False
    return ok


async def amain(args: argparse.Namespace) -> int:
    key = api_key(args.api_key_file)
    config = api.load_config(args.config, sections=("paths", "models")) if args.url is None or args.config else None
    url = args.url.rstrip("/").removesuffix("/v1") if args.url else None  # an OpenAI base_url works too
    endpoint = Endpoint.of(None if url else config, url)
    make = client_factory(endpoint, key, args.timeout)
    model, listed_context = await discover(make, endpoint, args.model)
    context, source = listed_context, "GET /v1/models"
    if context is None:
        context, source = config_context(config, model), "config"
    if context is None:
        context, source = DEFAULT_CONTEXT, "default"
    shape = Shape(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                  long_tokens=args.long_tokens or context // 4, collection=args.collection,
                  weights=parse_weights(args.weights))
    if args.mix in ("long", "mixed") and shape.long_tokens + shape.max_tokens > context:
        print(f"{PROG}: warning: --long-tokens {shape.long_tokens} + --max-tokens {shape.max_tokens} exceed the "
              f"context ({context}, {source}): expect 400s", file=sys.stderr)
    workload = Workload(model, args.mix, shape)
    plan = Plan(steps_for(args.users), args.duration, args.think, args.timeout, args.seed, args.stop_at_break,
                args.warmup)
    targets = Targets(args.max_error_rate, args.p99_ttft, args.p99_e2e)
    ramp = Ramp(plan, workload, make, targets)
    sizes = f"prompts ~{shape.prompt_tokens}" if args.mix == "chat" else f"long prompts ~{shape.long_tokens}"
    if args.mix == "rag":
        sizes = f"RAG from {shape.collection or 'every collection'}"
    elif args.mix == "mixed":
        sizes = "weights " + ", ".join(f"{k} {v:g}" for k, v in shape.weights.items() if v)
    header = (f"{PROG}: {model} at {endpoint}, mix {args.mix} ({sizes}, max_tokens {shape.max_tokens}); "
              f"users {', '.join(map(str, plan.steps))}, {args.duration:g} s a step"
              + (f", think 0-{args.think:g} s" if args.think else ""))
    print(header, flush=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    stopped_by = await run(ramp, Progress(plan))

    print()
    print(report.table(ramp.steps))
    for line in report.error_lines(ramp.steps, hint(key)):
        print(line)
    print(report.broke_line(ramp.steps, ramp.broke_at, len(plan.steps), targets))
    meta: dict[str, Any] = {
        "tool": PROG, "started_at": started, "target": str(endpoint), "model": model, "mix": args.mix,
        "plan": {"users": args.users, "steps": plan.steps, "duration_s": args.duration, "think_s": args.think,
                 "timeout_s": args.timeout, "seed": args.seed, "warmup": args.warmup},
        "shape": {"prompt_tokens": shape.prompt_tokens, "max_tokens": shape.max_tokens,
                  "long_tokens": shape.long_tokens, "collection": shape.collection,
                  "weights": shape.weights if args.mix == "mixed" else None},
        "context": {"tokens": context, "source": source},
    }
    doc = report.document(meta, ramp.steps, ramp.broke_at, ramp.interrupted, targets)
    written = write_outputs(args, doc, ramp, f"{model}, mix {args.mix}, {args.duration:g} s a step ({endpoint})")
    if args.json == "-":
        print(json.dumps(doc, separators=(",", ":")))
    if stopped_by is not None:
        return 128 + stopped_by
    return EX_BROKE if ramp.broke_at is not None or not written else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check(args)
        parse_weights(args.weights)
        if args.plot is not None:
            # Now, so a missing matplotlib fails before the run rather than after it.
            try:
                from daemons.loadtest import chart  # noqa: F401
            except ImportError as exc:
                raise UsageError(f"--plot needs matplotlib ({exc}): .venv/bin/pip install matplotlib") from None
        return asyncio.run(amain(args))
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EX_USAGE
    except (ConfigError, APIError) as exc:
        if isinstance(exc, APIError) and exc.status == 401:
            exc.message += " (the router wants an API key: --api-key-file F or $ONEBOX_API_KEY)"
        return api.failure(PROG, exc)
    except KeyboardInterrupt:  # before the ramp (its own handler), or a second Ctrl-C
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

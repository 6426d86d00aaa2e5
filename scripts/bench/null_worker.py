#!/usr/bin/env python3
"""A null inference worker for scripts/bench/router.py: a bus worker on the onebox
skeleton (daemons.bus.serve) that registers `infer/MODEL` and answers every request at
once, with one PARTIAL {"text": "ok"} and the FINAL the router's chat route expects. It
does no work, so what a client measures through the router is the router's (and the
bus's) own cost.

Usage: python scripts/bench/null_worker.py MODEL --config CFG [--capacity N]
The config needs a [models.MODEL] table (the router refuses other model names); its
`path` is never opened here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from daemons.bus import serve  # noqa: E402
from daemons.bus.worker import Emitter, Request  # noqa: E402

TEXT = {"text": "ok"}
FINAL = {"finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


class Null:
    """An engine with no thread of its own: submit() (the worker's main thread) answers."""

    def __init__(self, emit: Emitter) -> None:
        self.emit, self.served = emit, 0

    def start(self) -> None:
        pass

    def stop(self, timeout: float) -> None:
        pass

    def alive(self) -> bool:
        return True

    def failed(self) -> str | None:
        return None

    def status(self) -> str:
        return f"{self.served} answered"

    def status_map(self) -> dict[str, Any]:
        return {"engine": "null", "served": self.served}

    def cancel(self, request_id: str) -> None:
        pass

    def submit(self, req: Request) -> None:
        self.emit.partial(req.id, TEXT)
        self.emit.final(req.id, FINAL)
        self.served += 1


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model's key in the config: the worker serves infer/MODEL")
    parser.add_argument("--capacity", type=int, default=1024,
                        help="requests in flight the broker may send it (default 1024: never the limit)")


def load(loading: serve.Loading) -> serve.Served:
    model = loading.args.model
    if model not in loading.config.models:
        raise serve.LoadError(f"no [models.{model}] table in {loading.config.source}")
    return serve.Served(service=f"infer/{model}", capacity=loading.args.capacity, engine=Null,
                        ready_status="answering at once", shutdown_timeout_s=1.0, meta={"model": model, "engine": "null"})


def main(argv: list[str] | None = None) -> int:
    return serve.run(prog="null_worker", description="A bus worker that answers every infer/MODEL request at once.",
                     sections=("paths", "log", "bus", "models"), load=load,
                     name=lambda args: f"null@{args.model}", arguments=arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())

"""A chat worker on the onebox skeleton that answers like an inference daemon after a
delay: `python -m tests.workers.slow_chat_worker MODEL --delay S --slots N --config CFG`.
It says it has N slots (the router's fair queue sends it that many at once)."""
import argparse
import sys
import threading
from typing import Any

from daemons.bus import serve
from daemons.bus.worker import Emitter, Request


class Slow:
    delay = 0.5
    slots = 1

    def __init__(self, emit: Emitter) -> None:
        self.emit, self.served, self.busy = emit, 0, 0
        self.lock = threading.Lock()
    def start(self) -> None: pass
    def stop(self, timeout: float) -> None: pass
    def alive(self) -> bool: return True
    def failed(self) -> str | None: return None
    def status(self) -> str: return f"{self.served} answered"
    def status_map(self) -> dict[str, Any]:
        return {"engine": "slow", "slots": {"total": self.slots, "busy": self.busy}, "served": self.served}
    def cancel(self, request_id: str) -> None: pass

    def submit(self, req: Request) -> None:
        with self.lock:
            self.busy += 1
        threading.Timer(self.delay, self._answer, (req,)).start()

    def _answer(self, req: Request) -> None:
        self.emit.partial(req.id, {"text": "slow "})
        self.emit.partial(req.id, {"text": "answer"})
        self.emit.final(req.id, {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        with self.lock:
            self.busy -= 1
            self.served += 1


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model")
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--slots", type=int, default=1)


def load(loading: serve.Loading) -> serve.Served:
    Slow.delay, Slow.slots = loading.args.delay, loading.args.slots
    return serve.Served(service=f"infer/{loading.args.model}", capacity=64, engine=Slow, ready_status="slow",
                        shutdown_timeout_s=1.0)


if __name__ == "__main__":
    sys.exit(serve.run(prog="slow_chat_worker", description="Answer chats slowly.", sections=("paths", "log", "bus"),
                       load=load, name=lambda args: f"slow@{args.model}", arguments=arguments))

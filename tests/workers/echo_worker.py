"""A whole worker daemon on the onebox skeleton: it echoes its requests back."""
import sys
from typing import Any

from daemons.bus import serve
from daemons.bus.worker import Emitter, Request


class Echo:
    def __init__(self, emit: Emitter) -> None:
        self.emit, self.served = emit, 0
    def start(self) -> None: pass
    def stop(self, timeout: float) -> None: pass
    def alive(self) -> bool: return True
    def failed(self) -> str | None: return None
    def status(self) -> str: return f"{self.served} echoed"
    def status_map(self) -> dict[str, Any]: return {"echoed": self.served}
    def cancel(self, request_id: str) -> None: pass
    def submit(self, req: Request) -> None:
        for word in str(req.body.get("text", "")).split():
            self.emit.partial(req.id, {"word": word})
        self.served += 1
        self.emit.final(req.id, {"echo": req.body})


def load(loading: serve.Loading) -> serve.Served:
    return serve.Served(service="echo", capacity=8, engine=Echo, ready_status="echoing", shutdown_timeout_s=1.0)


if __name__ == "__main__":
    sys.exit(serve.run(prog="echo", description="Echo requests.", sections=("paths", "log", "bus"), load=load,
                       name="echo"))

"""Handing items from any thread to the one thread that owns a ZeroMQ socket.

A thread-safe queue plus a non-blocking pipe whose read end the owner's zmq.Poller
watches: `put()` from anywhere, `take()` in the owner after the poller says `fd` is
readable. At most one wake-up byte is written per batch, not one per item.
"""

from __future__ import annotations

import os
import queue
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signalled = False
        self._closed = False

    @property
    def fd(self) -> int:
        """Readable when items are waiting (for the owner's poller)."""
        return self._wake_r

    def put(self, item: T) -> None:
        self._queue.put(item)
        self.wake()

    def wake(self) -> None:
        """Make `fd` readable (also with nothing queued: a stop, say)."""
        if not self._signalled and not self._closed:
            self._signalled = True
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    def take(self) -> list[T]:
        """Everything queued so far (the owner's thread)."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        # Cleared before draining: a put() after this point writes a new wake-up.
        self._signalled = False
        out: list[T] = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        # A thread that outlived the owner (hung) must not write to a reused fd.
        self._closed = True
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

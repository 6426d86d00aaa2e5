"""The batch engine's output path: a sampled token becomes text on the request's
stream (daemons/infer/reply.py: UTF-8 and stop strings) or ends the request."""

from __future__ import annotations

from typing import Protocol

from daemons.infer.seq import Seq
from daemons.llama import Pieces


class Vocab(Protocol):
    def is_eog(self, token: int) -> bool: ...


def accept(s: Seq, token: int, vocab: Vocab, pieces: Pieces) -> str | None:
    """Take `s`'s next sampled token: None while it goes on (the token is then its
    `pending` one, decoded next step), else the finish reason ("stop" or "length")."""
    if vocab.is_eog(token):
        s.reply.first_token()
        return "stop"
    s.produced += 1
    s.generated.append(token)
    if s.reply.piece(pieces(token)):
        return "stop"
    if s.produced >= s.max_new:
        return "length"
    s.pending = token
    return None

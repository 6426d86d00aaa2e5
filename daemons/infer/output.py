"""The batch engine's output path: a sampled token becomes text on the request's
stream (daemons/infer/reply.py: UTF-8 and stop strings) or ends the request."""

from __future__ import annotations

from typing import Any, Protocol

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
    data = pieces(token)
    lp = s.sampler.logprob
    if s.reply.piece(data, None if lp is None else logprob_entry(token, data, lp, pieces)):
        return "stop"
    if s.produced >= s.max_new:
        return "length"
    s.pending = token
    return None


def _token(data: bytes) -> dict[str, Any]:
    return {"token": data.decode("utf-8", "replace"), "bytes": list(data)}


def logprob_entry(token: int, data: bytes, lp: tuple[float, list[tuple[int, float]]],
                  pieces: Pieces) -> dict[str, Any]:
    """One token's logprobs in OpenAI's shape: token, logprob, bytes, top_logprobs."""
    chosen, best = lp
    return {**_token(data), "logprob": round(chosen, 6),
            "top_logprobs": [{**_token(pieces(t)), "logprob": round(v, 6)} for t, v in best]}

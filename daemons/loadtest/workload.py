"""What the simulated users ask: short chats, RAG questions, long documents, or a
weighted mix of the three, as chat-completion bodies (streamed, with a usage chunk).

The client has no tokenizer for the model (it may be any model, even a remote one), so
prompt sizes are estimates: the text is built from common English words, each one token
in the BPE vocabularies these models use (SmolLM2's: 1.0 token a word). The usage chunk
reports the real prompt_tokens, which stats.py passes on, so the estimate is checked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

KINDS = ("chat", "rag", "long")
MIXES = (*KINDS, "mixed")
# mixed: mostly short chats, as on a shared box; some RAG questions, a few long documents.
DEFAULT_WEIGHTS = {"chat": 7.0, "rag": 2.0, "long": 1.0}
# The chat template, the question and the full stops cost tokens beyond the words.
TOKENS_PER_WORD = 1.1
DEFAULT_CONTEXT = 2048  # when neither /v1/models nor the config says

TOPICS = ["rivers", "volcanoes", "bees", "lighthouses", "chess", "glaciers", "owls", "bridges", "tea", "comets",
          "deserts", "violins", "coral reefs", "trains", "maps", "bread", "wolves", "clocks", "salt", "kites",
          "caves", "whales", "paper", "tides", "apples", "windmills", "ants", "mirrors", "snow", "compasses"]
WORDS = ("the of and to in is that for it as with was on be by at this from or have an are not but had his they "
         "which you were her one all we can there their has been if more when will would who so no time year "
         "people way day man thing woman life child world school state family student group country problem hand "
         "part place case week company system program question work government number night point home water "
         "room mother area money story fact month lot right study book eye job word business issue side kind head "
         "house service friend father power hour game line end member law car city community name team minute "
         "idea kid body information back parent face others level office door health person art war history party "
         "result change morning reason research girl guy moment air teacher force education").split()


class UsageError(ValueError):
    """A bad --mix or --weights."""


def parse_weights(text: str) -> dict[str, float]:
    """"chat=7,rag=2,long=1" -> {"chat": 7.0, ...}; kinds left out weigh 0."""
    weights = dict.fromkeys(KINDS, 0.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise UsageError(f"--weights: expected KIND=WEIGHT with KIND one of {', '.join(KINDS)}, got {item!r}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise UsageError(f"--weights: {value!r} is not a number") from None
        if weights[kind] < 0:
            raise UsageError(f"--weights: {kind} must not be negative")
    if not any(weights.values()):
        raise UsageError("--weights: at least one kind needs a weight above 0")
    return weights


def words(rng: random.Random, n: int) -> str:
    """About n tokens of text: sentences of 8 to 15 common words."""
    out: list[str] = []
    while len(out) < n:
        sentence = [rng.choice(WORDS) for _ in range(min(n - len(out), rng.randint(8, 15)))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        out += sentence
    return " ".join(out)


@dataclass(frozen=True)
class Shape:
    """The knobs of the requests: sizes, and the RAG collection."""

    prompt_tokens: int = 20
    max_tokens: int = 64
    long_tokens: int = DEFAULT_CONTEXT // 4
    collection: str | None = None
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))


class Workload:
    """Picks each request's kind (by the mix) and writes its body."""

    def __init__(self, model: str, mix: str, shape: Shape) -> None:
        if mix not in MIXES:
            raise UsageError(f"--mix must be one of {', '.join(MIXES)}")
        self.model = model
        self.mix = mix
        self.shape = shape
        self.kinds = [k for k in KINDS if mix == "mixed" and shape.weights.get(k, 0) > 0] or [mix]
        self.cum: list[float] = []
        total = 0.0
        for kind in self.kinds:
            total += shape.weights.get(kind, 0.0) if mix == "mixed" else 1.0
            self.cum.append(total)

    def pick(self, rng: random.Random) -> str:
        if len(self.kinds) == 1:
            return self.kinds[0]
        return rng.choices(self.kinds, cum_weights=self.cum)[0]

    def prompt(self, kind: str, rng: random.Random) -> str:
        topic = rng.choice(TOPICS)
        if kind == "long":
            # Distinct random text in every request: a shared document would be served from
            # the prefix cache after the first time, and this mix is about prefill cost.
            budget = max(16, int(self.shape.long_tokens / TOKENS_PER_WORD) - 12)
            return (f"Here is a report about {topic}.\n\n{words(rng, budget)}\n\n"
                    "Summarise the report in three sentences.")
        if kind == "rag":
            return f"What do our documents say about {topic}? Quote the most useful passage."
        question = f"In a few sentences, tell me something surprising about {topic}."  # ~13 tokens
        pad = int(self.shape.prompt_tokens / TOKENS_PER_WORD) - 13
        return f"{words(rng, pad)} {question}" if pad > 0 else question

    def body(self, kind: str, rng: random.Random) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt(kind, rng)}],
            "max_tokens": self.shape.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if kind == "rag":
            body["rag"] = {"collection": self.shape.collection} if self.shape.collection else {}
        return body

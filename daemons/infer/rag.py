"""The RAG prompt: retrieved passages, numbered, in the system message, so the model
answers from them and cites them as [1], [2]. The router retrieves; the inference daemon
decides how many passages fit (it has the tokenizer and the context size)."""

from __future__ import annotations

from collections.abc import Sequence

from daemons.infer.request import Source

INSTRUCTIONS = (
    "Answer the user's question using the numbered sources below. Cite the sources you use "
    "as [1], [2] right after the statements they support. If the sources do not contain the "
    "answer, say that they do not."
)


def sources_block(sources: Sequence[Source]) -> str:
    parts = [INSTRUCTIONS, ""]
    for n, s in enumerate(sources, 1):
        parts.append(f"[{n}] {s.label}".rstrip())
        parts.append(s.text.strip())
        parts.append("")
    return "\n".join(parts).rstrip()


def messages_with_sources(messages: list[dict[str, str]], sources: Sequence[Source]) -> list[dict[str, str]]:
    """The conversation with the sources in its system message (added first when there is
    none: many chat templates accept a system message only there)."""
    if not sources:
        return messages
    block = sources_block(sources)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{block}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]

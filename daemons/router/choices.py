"""n choices and lists of prompts: one bus call per choice, fanned out by the router.

A chat or completion asking for n choices, or a /v1/completions request with a list of
prompts, becomes one bus call per choice, all opened at once: the batch engine lets
concurrent sequences with a common prompt share its KV cells (daemons/infer/engine.py),
so each prompt is prefilled once. Choice k of prompt p has index p * n + k, as OpenAI
numbers them; with a seed, choice k samples with seed + k so that the choices differ.
Admission reserves the bound of every choice; the call has one ledger row, its usage
summed (prompt tokens once per prompt, completion tokens of every choice). One choice
that fails fails the call with its error, and the others are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from daemons.router import pricing
from daemons.router.dispatch import Opened, Pair
from daemons.router.identity import Principal
from daemons.router.limits import Grant
from daemons.router.meter import Meter, admit

if TYPE_CHECKING:
    from daemons.router.state import RouterState

log = logging.getLogger(__name__)

SEEDS = 2**63


def bodies(body: dict[str, Any], prompts: list[str] | None, n: int) -> list[dict[str, Any]]:
    """The bus body of each choice, in index order (`prompts`: a completion's list)."""
    out = []
    each_prompt: list[str | None] = list(prompts) if prompts else [None]
    for prompt in each_prompt:
        for k in range(n):
            each = dict(body)
            if prompt is not None:
                each["prompt"] = prompt
            if k and body.get("seed") is not None:
                each["seed"] = (int(body["seed"]) + k) % SEEDS
            out.append(each)
    return out


def call_id(request_id: str, index: int) -> str:
    """The bus call id of a choice: the request's own for the first (the worker logs it)."""
    return request_id if index == 0 else f"{request_id}-{index}"


def reserve(state: RouterState, meter: Meter, chain: list[str], calls: list[dict[str, Any]], n: int) -> Grant:
    """Admit the call for all its choices: the most each could cost (a prompt's bound
    counts once per choice), and the prompts' bound for billing a call without usage."""
    per_prompt = [pricing.chain_bound(state.config, chain, b) for b in calls[::n]]
    meter.prompt_bound = sum(b.prompt for b in per_prompt)
    return admit(state, meter, n * sum(b.cost for b in per_prompt), n * sum(b.tokens for b in per_prompt))


async def open_all(state: RouterState, who: Principal, request_id: str, model: str, calls: list[dict[str, Any]],
                   deadline: float, gone: asyncio.Future[None], residency: str | None, stream: bool) -> list[Opened]:
    """Every choice's call, once each has its first reply; the first failure fails all."""
    if len(calls) == 1:
        return [await state.dispatch.open(who, request_id, model, calls[0], deadline, gone, residency, stream=stream)]
    tasks = [asyncio.ensure_future(state.dispatch.open(who, call_id(request_id, i), model, body, deadline, gone,
                                                       residency, stream=stream))
             for i, body in enumerate(calls)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:  # in index order: the lowest choice that failed names the error
            exc = task.exception() if task in done and not task.cancelled() else None
            if exc is not None:
                raise exc
        return [task.result() for task in tasks]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all([t.result() for t in tasks if not t.cancelled() and t.exception() is None])
        raise


async def close_all(opened: list[Opened]) -> None:
    """End every call (CANCEL to those unfinished) and give their places back."""
    for result in await asyncio.gather(*(o.close() for o in opened), return_exceptions=True):
        if isinstance(result, BaseException):
            log.warning("closing a call failed: %r", result)


async def merged(opened: list[Opened]) -> AsyncGenerator[tuple[int, str, dict[str, Any]], None]:
    """(choice, kind, data) of every call's replies as they come, each call's first reply
    first, until every call has given its FINAL. A call's error is raised here."""
    if len(opened) == 1:
        kind, data = opened[0].first
        yield 0, kind, data
        while kind == "partial":
            kind, data = await anext(opened[0].replies)
            yield 0, kind, data
        return
    queue: asyncio.Queue[tuple[int, Pair | Exception]] = asyncio.Queue()

    async def pump(index: int, call: Opened) -> None:
        pair = call.first
        try:
            queue.put_nowait((index, pair))
            while pair[0] == "partial":
                pair = await anext(call.replies)
                queue.put_nowait((index, pair))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((index, exc))

    pumps = [asyncio.create_task(pump(i, o)) for i, o in enumerate(opened)]
    try:
        left = len(opened)
        while left:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            kind, data = item
            if kind != "partial":
                left -= 1
            yield index, kind, data
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def usage(finals: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The call's usage: each prompt's tokens once (its first choice's), every choice's
    completion tokens."""
    if len(finals) == 1:
        return dict(finals[0].get("usage") or {})
    each = [f.get("usage") or {} for f in finals]
    firsts = each[::n]
    out: dict[str, Any] = {"prompt_tokens": sum(int(u.get("prompt_tokens", 0) or 0) for u in firsts),
                           "completion_tokens": sum(int(u.get("completion_tokens", 0) or 0) for u in each)}
    if any("cached_tokens" in u for u in firsts):
        out["cached_tokens"] = sum(int(u.get("cached_tokens", 0) or 0) for u in firsts)
    return out

"""Tool calls: declared tools into the prompt, and the model's output back into calls.

A model whose GGUF chat template renders tools (its Jinja reads `tools`, as those of
Qwen 2.5, Llama 3.1, Hermes and SmolLM3 do) gets them through its own template, as
llama-server's --jinja does. Any other model gets onebox's generic format, which the
tool-call grammar (daemons/infer/constrain.py) also follows:

- a system message lists the tools (one JSON object each: name, description,
  parameters) and says how to call one:

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Oslo"}}
      </tool_call>

- an assistant message's earlier `tool_calls` are rendered as such blocks, and `tool`
  messages as a user turn holding <tool_response>...</tool_response> (templates such as
  Gemma's accept only alternating user and assistant turns).

Output is parsed the same way for both (the <tool_call> blocks Hermes-style templates
use; a native template's bare {"name": ..., "arguments"|"parameters": ...} reply too):
`ToolCalls` turns streamed text into text and complete calls.
"""

from __future__ import annotations

import json
import os
from typing import Any

from daemons.infer.constrain import TOOL_CLOSE, TOOL_OPEN

OPEN, CLOSE = TOOL_OPEN.strip(), TOOL_CLOSE.strip()


def template_takes_tools(template: str) -> bool:
    """The chat template renders a `tools` list (its Jinja reads the variable)."""
    return "tools" in template


def _arguments(raw: Any) -> Any:
    """A call's arguments as an object for rendering (OpenAI sends a JSON string)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _block(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    body = json.dumps({"name": fn.get("name", ""), "arguments": _arguments(fn.get("arguments", "{}"))},
                      ensure_ascii=False)
    return f"{TOOL_OPEN}{body}{TOOL_CLOSE}"


def system_text(tools: list[dict[str, Any]], choice: str | dict[str, str]) -> str:
    listed = "\n".join(json.dumps({"name": t["name"], "description": t.get("description", ""),
                                   "parameters": t.get("parameters") or {"type": "object"}}, ensure_ascii=False)
                       for t in tools)
    text = ("You can call these tools:\n<tools>\n" + listed + "\n</tools>\n"
            f"To call a tool, reply with only\n{TOOL_OPEN}" + '{"name": "<tool name>", "arguments": {<its arguments>}}'
            + f"{TOOL_CLOSE}\n(one such block per call). Each result comes back as <tool_response>...</tool_response>.")
    if choice == "required":
        text += "\nAnswer with a tool call."
    elif isinstance(choice, dict):
        text += f"\nAnswer with a call to {choice['name']}."
    return text


def generic_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                     choice: str | dict[str, str]) -> list[dict[str, str]]:
    """The conversation in the generic format: plain role/content messages any template takes
    (the messages themselves when there is nothing to render: no tools, no tool turns)."""
    if not (tools and choice != "none") and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return messages
    out: list[dict[str, str]] = []
    if tools and choice != "none":
        head = system_text(tools, choice)
        if messages and messages[0]["role"] in ("system", "developer"):
            head = f"{messages[0]['content']}\n\n{head}"
            messages = messages[1:]
        out.append({"role": "system", "content": head})
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif role == "assistant" and m.get("tool_calls"):
            blocks = "\n".join(_block(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{blocks}" if content else blocks})
        else:
            out.append({"role": "developer" if role == "developer" else role, "content": content})
    return out


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself: tool_calls with their arguments
    as objects (what such templates print with tojson)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"].get(
                "arguments", "{}"))}} for c in m["tool_calls"]]
        out.append(m)
    return out


def native_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                              "parameters": t.get("parameters") or {"type": "object"}}}
            for t in tools]


class ToolCalls:
    """Streamed output text in; text to show and complete tool calls out.

    Text that may be the start of a <tool_call> block is held back until it is known
    not to be; a block becomes a call when it closes (or the output ends) and its JSON
    names a declared tool. Anything else stays text, so a model that answers in prose
    loses nothing."""

    def __init__(self, names: set[str], parallel: bool, bare_json: bool) -> None:
        self.names = names
        self.parallel = parallel
        self.bare_json = bare_json  # a native template's {"name": ...} reply counts as a call
        self.calls = 0
        self._buf = ""
        self._in_call = False
        self._shown = False  # text went out: a bare JSON reply is no longer possible

    def _call(self, raw: str) -> dict[str, Any] | None:
        try:
            obj = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if self.calls and not self.parallel:
            return {}  # parallel_tool_calls false: the first call only
        call = {"index": self.calls, "id": "call_" + os.urandom(12).hex(), "name": obj["name"],
                "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}
        self.calls += 1
        return call

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        shown: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            if self._in_call:
                end = self._buf.find(CLOSE)
                if end < 0:
                    break
                raw, self._buf, self._in_call = self._buf[:end], self._buf[end + len(CLOSE):], False
                call = self._call(raw.strip())
                if call is None:
                    shown.append(f"{OPEN}{raw}{CLOSE}")
                elif call:
                    calls.append(call)
                continue
            if self.bare_json and not self._shown and self._buf.lstrip().startswith("{"):
                break  # held whole: decided at the end
            start = self._buf.find(OPEN)
            if start >= 0:
                shown.append(self._buf[:start])
                self._buf, self._in_call = self._buf[start + len(OPEN):], True
                continue
            hold = next((k for k in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                         if self._buf.endswith(OPEN[:k])), 0)
            if not self._buf.strip():
                hold = len(self._buf)  # only whitespace: between calls, or before a bare JSON reply
            shown.append(self._buf[:len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold:]
            break
        text_out = "".join(shown)
        if calls or text_out.strip():
            self._shown = True
        return text_out, calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        rest, self._buf = self._buf, ""
        if self._in_call:
            call = self._call(rest.strip())  # the model stopped before closing the block
            if call is not None:
                return "", [call] if call else []
            # Cut off inside a call (max_tokens): after complete calls it is dropped.
            return ("", []) if self.calls else (OPEN + rest, [])
        if self.calls and OPEN.startswith(rest.strip()):
            return "", []  # whitespace after the calls, or the start of one more cut off
        if self.bare_json and not self._shown and rest.strip().startswith("{"):
            call = self._call(rest.strip())
            if call is not None:
                return "", [call] if call else []
        return rest, []

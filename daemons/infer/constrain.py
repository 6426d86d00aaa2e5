"""Grammars that constrain sampling: JSON output (`response_format`) and tool calls.

JSON Schema goes to GBNF through llama-cpp-python's converter (llama_cpp.llama_grammar,
a port of llama.cpp's json_schema_to_grammar.py); llama.cpp's grammar sampler then masks
every token that would leave the grammar (daemons/infer/native.py Sampler). The
converter skips keywords it does not know without a word, which would let output that
breaks the schema through: a schema using one is refused here with a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from llama_cpp import llama_grammar

from daemons.bus.errors import RequestError

# What the converter enforces (the rest of JSON Schema is refused, see `unsupported`).
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern", "format", "minLength", "maxLength",
})
# Carry no constraint: fine to ignore.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs", "definitions",
    "deprecated", "readOnly", "writeOnly", "strict", "nullable",
})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# Keys whose value is a map of name -> subschema, or a subschema, or a list of them.
MAPS = ("properties", "$defs", "definitions")
SUBS = ("items", "additionalProperties")
LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
MAX_SCHEMA_BYTES = 64 * 1024
TOOL_OPEN, TOOL_CLOSE = "<tool_call>\n", "\n</tool_call>"


def unsupported(schema: Any, where: str = "schema") -> Iterator[str]:
    """Where and what, for each part of `schema` the converter would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        yield f"{where}: a schema must be an object"
        return
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            yield f"{where}: keyword '{key}'"
        elif key == "format" and value not in FORMATS:
            yield f"{where}: format '{value}'"
        elif key == "type":
            kinds = value if isinstance(value, list) else [value]
            for kind in kinds:
                if kind not in TYPES:
                    yield f"{where}: type {kind!r}"
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
            yield f"{where}: $ref {value!r} (only local references, '#/...')"
        elif key in MAPS:
            if not isinstance(value, dict):
                yield f"{where}.{key}: must be an object"
                continue
            for name, sub in value.items():
                yield from unsupported(sub, f"{where}.{key}.{name}")
        elif key in SUBS and not isinstance(value, bool):
            yield from unsupported(value, f"{where}.{key}")
        elif key in LISTS:
            if not isinstance(value, list):
                yield f"{where}.{key}: must be a list"
                continue
            for i, sub in enumerate(value):
                yield from unsupported(sub, f"{where}.{key}[{i}]")


def check_schema(schema: Any, where: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise RequestError(f"{where} must be a JSON Schema object", 400)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise RequestError(f"{where} is larger than {MAX_SCHEMA_BYTES} bytes", 400)
    problems = list(unsupported(schema, where))
    if problems:
        raise RequestError("unsupported JSON Schema for constrained output (it could not be enforced): "
                           + "; ".join(problems[:5]), 400)
    return schema


def _converter(schemas: dict[str, Any]) -> Any:
    """A converter with each schema's local $refs resolved within that schema (`schemas`:
    a distinct name for each, so two tools' "#/$defs/X" stay apart)."""
    make: Any = llama_grammar.SchemaConverter  # untyped
    conv = make(prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False,
                           raw_pattern=False)
    for url, schema in schemas.items():
        conv.resolve_refs(schema, url)
    return conv


def _convert(build: Any) -> str:
    try:
        return str(build())
    except RequestError:
        raise
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise RequestError(f"cannot turn this JSON Schema into a grammar: {exc}", 400) from None


def json_grammar(response_format: dict[str, Any]) -> str:
    """GBNF for {"type": "json_object"} (any JSON object) or {"type": "json_schema",
    "schema": {...}}."""
    schema = {"type": "object"} if response_format.get("type") == "json_object" else \
        check_schema(response_format.get("schema"), "response_format.json_schema.schema")

    def build() -> str:
        conv = _converter({"root": schema})
        conv.visit(schema, "")
        return str(conv.format_grammar())

    return _convert(build)


def tool_grammar(tools: list[dict[str, Any]], only: str | None, parallel: bool) -> str:
    """GBNF for output that is one (or, when `parallel`, one or more) call to a declared
    tool (to `only` when named) in the generic format, with arguments matching the
    tool's parameters schema:

        <tool_call>
        {"name": "get_weather", "arguments": {"city": "Oslo"}}
        </tool_call>
    """
    chosen = [t for t in tools if only is None or t["name"] == only]
    calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                         "arguments": t.get("parameters") or {"type": "object"}},
                        "required": ["name", "arguments"]} for t in chosen]}

    def build() -> str:
        conv = _converter({f"tool-{t['name']}": t["parameters"] for t in chosen if t.get("parameters")})
        call = conv.visit(calls, "call")
        one = f'{conv._format_literal(TOOL_OPEN)} {call} {conv._format_literal(TOOL_CLOSE)}'
        conv._add_rule("root", f'{one} ("\\n" {one})*' if parallel else one)
        return str(conv.format_grammar())

    return _convert(build)

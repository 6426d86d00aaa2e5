"""Declaring config sections once: types, constraints and documentation on each field.

A section is a frozen dataclass whose fields are declared with `setting()`. From that
one declaration come the parser (`build`, which collects every error with its key
instead of stopping at the first), the error messages, and the documented defaults
(`render_defaults`, which writes the TOML file a new box starts from).

Field types understood: str, int, float (an int is accepted), bool, `Literal[...]` of
strings, `tuple[str, ...]` / `tuple[int, ...]` (TOML arrays), and a nested section
dataclass. A section may add cross-field checks in a `problems()` method that yields
"key: message" strings.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal



class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
Check = Callable[[Any], str | None]


class ConfigError(Exception):
    """A config that cannot be used; the message says what and where (one line per error)."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors if errors is not None else [message]


@dataclass(frozen=True)
class Rule:
    doc: str
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    check: Check | None = None
    # Shown in the documented defaults instead of the default (e.g. a required path).
    example: Any = _MISSING


def setting(default: Any, doc: str, *, ge: float | None = None, le: float | None = None,
            gt: float | None = None, check: Check | None = None, example: Any = _MISSING) -> Any:
    """A config field: its default, what it is for (written into the default config),
    and the constraints the parser enforces."""
    rule = Rule(doc=doc, ge=ge, le=le, gt=gt, check=check, example=example)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for array defaults (sections are frozen)")
    return dataclasses.field(default=default, metadata={"rule": rule})


def rule_of(f: dataclasses.Field[Any]) -> Rule:
    rule = f.metadata.get("rule")
    return rule if isinstance(rule, Rule) else Rule(doc="")


def is_section(cls: Any) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"array of {_type_name(typing.get_args(hint)[0])}"
    if is_section(hint):
        return "table"
    return getattr(hint, "__name__", str(hint))


def _got(value: Any) -> str:
    kind = {str: "string", int: "integer", float: "float", bool: "boolean", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def convert(where: str, value: Any, hint: Any, errors: list[str]) -> Any:
    """`value` as `hint`, or _MISSING after recording why not."""
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool):
        if type(value) is not hint:
            errors.append(f"{where}: expected {_type_name(hint)}, got {_got(value)}")
            return _MISSING
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or type(value) is not str:
            errors.append(f"{where}: expected one of {_type_name(hint)}, got {_got(value)}")
            return _MISSING
        return value
    if origin is tuple:
        if not isinstance(value, list):
            errors.append(f"{where}: expected {_type_name(hint)}, got {_got(value)}")
            return _MISSING
        item_hint = typing.get_args(hint)[0]
        items = [convert(f"{where}[{i}]", v, item_hint, errors) for i, v in enumerate(value)]
        return _MISSING if any(i is _MISSING for i in items) else tuple(items)
    if is_section(hint):
        return build(hint, value, where, errors)
    raise TypeError(f"{where}: config fields of type {hint!r} are not supported")  # a bug in a section


def _bounds(where: str, value: Any, rule: Rule, errors: list[str]) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    problem = None
    if rule.ge is not None and value < rule.ge:
        problem = f"at least {rule.ge:g}"
    elif rule.le is not None and value > rule.le:
        problem = f"at most {rule.le:g}"
    elif rule.gt is not None and value <= rule.gt:
        problem = f"more than {rule.gt:g}"
    if problem:
        errors.append(f"{where}: must be {problem}, got {value:g}")
    return problem is None


def build(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    """An instance of section `cls` from a TOML table. Every problem is appended to
    `errors` ("key: message"); fields with errors keep their defaults, so the caller
    always gets an object and decides whether the errors matter to it."""
    if not isinstance(data, Mapping):
        errors.append(f"{where}: expected a table, got {_got(data)}")
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            errors.append(f"{where}.{key}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name not in data:
            # A check holds for the value in effect: a required field has a default that fails it.
            rule = rule_of(f)
            problem = rule.check(f.default) if rule.check is not None else None
            if problem:
                errors.append(f"{key}: {problem}")
            continue
        value = convert(key, data[name], hints[name], errors)
        if value is _MISSING:
            continue
        rule = rule_of(f)
        if not _bounds(key, value, rule, errors):
            continue
        if rule.check is not None:
            problem = rule.check(value)
            if problem:
                errors.append(f"{key}: {problem}")
                continue
        kwargs[name] = value
    section = cls(**kwargs)
    problems: Callable[[], Iterator[str]] | None = getattr(section, "problems", None)
    if problems is not None:
        errors.extend(f"{where}.{p}" for p in problems())
    return section


# -- the documented defaults -----------------------------------------------------------

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.strip().splitlines()] if text.strip() else []


def render_section(cls: type, table: str, doc: str) -> list[str]:
    lines = [""] + _comment(doc) + [f"[{table}]"]
    nested: list[tuple[str, type, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        rule = rule_of(f)
        if not f.init:
            continue
        if is_section(hints[f.name]):
            nested.append((f.name, hints[f.name], rule.doc))
            continue
        value = rule.example if rule.example is not _MISSING else f.default
        lines += _comment(rule.doc) + [f"{f.name} = {toml_value(value)}"]
    for name, sub, sub_doc in nested:
        lines += render_section(sub, f"{table}.{name}", sub_doc)
    return lines

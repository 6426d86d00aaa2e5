"""`onebox plan`: the KV-cache planner. How much memory N users of a given context need
with a model, how many fit a budget (with a shared prefix too), and the [models.X]
table that serves them.

The model's shape comes from its GGUF header (daemons/gguf_header.py, no weights loaded)
or from explicit numbers; the arithmetic is daemons/plan.py, which adds up the way the
inference daemon's own start check does (daemons/infer/memory.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemons import models, plan
from daemons.gguf_header import GgufError, arch_of, read_header
from daemons.config import Config, ConfigError, ModelConfig
from daemons.ctl import api
from daemons.infer import memory
from daemons.infer.memory import KV_TYPES

EX_CONFIG = 78
GB, GIB, MIB = 10**9, 2**30, 2**20

# -- command-line values -------------------------------------------------------------

class BadInput(Exception):
    """Input that cannot be planned for: exit 2 with this line."""


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12,
          "kib": 2**10, "mib": MIB, "gib": GIB, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """24GiB, 24GB, 1.5TB or plain bytes. A bare G (or K, M, T) is refused: 7% apart."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        hint = " (say GB for 10^9 bytes or GiB for 2^30)" if m and m.group(2) in ("k", "m", "g", "t") else ""
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 24GiB, 24GB or 25769803776{hint}")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def parse_params(text: str) -> int:
    """20B, 135M, 1.5T or a plain count (parameters are counted in powers of ten)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a parameter count such as 20B or 135M")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}[m.group(2)])


def parse_tokens(text: str) -> int:
    """32768 or 32K (a context's K is 1024 tokens, as in "32K context")."""
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of tokens such as 32768 or 32K")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def weight_bits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bits per weight, e.g. 16 or 4.5") from None
    if not 0 < value <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: bits per weight are between 0 and 64")
    return value


# -- the plan --------------------------------------------------------------------------

@dataclass
class Model:
    """The model being planned for, wherever its numbers came from."""

    arch: plan.Arch
    weights: int | None
    weights_from: str
    source: str  # "gguf" or "explicit"
    table: str   # the [models.X] name to recommend under
    path: Path | None = None
    path_spec: str | None = None  # `path` for a new [models.X]: as given when the config would find it so
    name: str | None = None  # its [models.NAME], when it came from the config
    config: ModelConfig | None = None
    architecture: str | None = None
    description: str | None = None


def _table_name(text: str) -> str:
    """A bare TOML key from a model's name."""
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "NAME"


def load_model(args: argparse.Namespace, config: Config | None = None) -> Model:
    explicit = [f for f in ("layers", "kv_heads", "head_dim") if getattr(args, f) is not None]
    if args.model is None:
        if len(explicit) < 3:
            missing = ", ".join(f"--{f.replace('_', '-')}" for f in ("layers", "kv_heads", "head_dim")
                                if getattr(args, f) is None)
            raise BadInput(f"give --model GGUF|NAME, or the architecture: {missing} missing")
        if args.params is not None and args.model_bytes is not None:
            raise BadInput("give --params or --model-bytes, not both")
        arch = plan.Arch.uniform(args.layers, args.kv_heads, args.head_dim, args.value_dim, args.vocab or 0)
        if args.model_bytes is not None:
            weights, weights_from = args.model_bytes, "--model-bytes"
        elif args.params is not None:
            weights = int(args.params * args.weight_bits / 8)
            weights_from = f"{args.params / 1e9:g}B parameters x {args.weight_bits:g} bit"
        else:
            weights, weights_from = None, "unknown: give --params or --model-bytes"
        return Model(arch, weights, weights_from, "explicit", "NAME")
    given = [f"--{f.replace('_', '-')}" for f in explicit + ["value_dim", "params", "model_bytes", "vocab"]
             if getattr(args, f) is not None]
    if given:
        raise BadInput(f"{', '.join(given)}: only without --model (the GGUF says)")
    path, name, mc = find_model(args.model, args.config, config)
    try:
        header = read_header(path)
        arch = arch_of(header.metadata)
    except GgufError as exc:
        raise BadInput(f"{path}: {exc}") from None
    meta = header.metadata
    basename = meta.get("general.basename") or meta.get("general.name") or path.stem
    weights_from = "tensors in the GGUF" if header.tensor_bytes is not None else "unknown: a tensor type gguf does not know"
    spec = str(path.resolve()) if Path(args.model).is_file() else args.model
    return Model(arch, header.tensor_bytes, weights_from, "gguf", name or _table_name(str(basename)), path=path,
                 path_spec=spec, name=name, config=mc, architecture=str(meta.get("general.architecture", "llama")),
                 description=str(meta.get("general.name", path.name)))


def find_model(spec: str, config_path: str | None,
               config: Config | None = None) -> tuple[Path, str | None, ModelConfig | None]:
    """A GGUF file, a configured model's name, or a path relative to the models dir or
    to a model package (as a config's `path`); ConfigError when the config is needed and bad."""
    if Path(spec).is_file():
        return Path(spec), None, None
    if Path(spec).is_absolute():
        raise BadInput(f"model file {spec} does not exist")
    if config is None:
        config = api.load_config(config_path, sections=("paths", "models"))
    try:
        if spec in config.models:
            mc = config.model(spec)
            return models.resolve(mc.path, config.paths.models), spec, mc
        if spec.endswith(".gguf") or "/" in spec:
            return models.resolve(spec, config.paths.models), None, None
    except FileNotFoundError as exc:
        raise BadInput(str(exc)) from None
    known = ", ".join(sorted(config.models)) or "none"
    raise BadInput(f"--model {spec!r}: no such GGUF file and no [models.{spec}] in {config.source} "
                   f"(configured: {known})")


def _budget(args: argparse.Namespace, m: Model) -> tuple[int, str]:
    if args.memory is not None:
        return args.memory, "--memory"
    if m.config is not None and m.config.memory_budget_mb:
        return m.config.memory_budget_mb * MIB, f"[models.{m.name}] memory_budget_mb"
    return memory.budget_bytes(0), "80% of this machine's RAM, the default"


def _memory(p: memory.MemoryPlan, slots: int) -> dict[str, Any]:
    return {"kv_tokens": p.kv_cells, "slots": slots, "bytes_per_cell": p.bytes_per_cell, "model": p.model,
            "kv": p.kv, "compute": p.compute, "runtime": p.runtime, "headroom": memory.RUNTIME_HEADROOM,
            "total": p.total, "budget": p.budget, "fits": p.fits}


def _notes(m: Model, kv_type: str, ctx: int, users: int, best: int) -> list[str]:
    """What a reader of the plan should know: unknowns, the model's quirks, the daemon's limits."""
    arch, mc = m.arch, m.config or ModelConfig()
    daemon_cell = plan.daemon_bytes_per_cell(arch, kv_type)
    notes: list[str] = []
    if m.weights is None:
        notes.append(f"the weights' size is unknown ({m.weights_from}): the totals and the users that fit "
                     "leave them out")
    if m.source == "explicit":
        notes.append("compute buffers from the logits alone (no GGUF to give the layers' widths), for a "
                     f"vocabulary of {arch.n_vocab or plan.ASSUMED_VOCAB:,}"
                     + ("" if arch.n_vocab else " (assumed, Llama 3's; --vocab sets it)"))
    if arch.per_layer_heads:
        notes.append(f"KV heads vary by layer ({min(arch.n_head_kv)} to {max(arch.n_head_kv)}); the daemon's "
                     f"start check counts layer 0's {arch.n_head_kv[0]} in every layer: {daemon_cell:,} B per "
                     f"cell against the {plan.bytes_per_cell(arch, kv_type):,} B llama.cpp allocates ({kv_type}). "
                     "The plan uses the larger.")
    if arch.key_length != arch.value_length:
        notes.append(f"keys and values differ in size: {arch.key_length} and {arch.value_length} per head")
    if arch.n_swa:
        which = (f"{sum(arch.swa_layers)} of {arch.n_layer} layers" if arch.swa_layers is not None
                 else "some layers (the GGUF does not say which)")
        notes.append(f"sliding window of {arch.n_swa:,} tokens on {which}: llama.cpp still gives them full-size "
                     "caches here (swa_full, its default, which onebox keeps), so they are counted in full")
    if arch.recurrent:
        notes.append("a recurrent or hybrid model: its per-sequence state is not counted, and the batch engine "
                     "cannot serve it (onebox falls back to the simple engine, one request at a time)")
    if arch.n_ctx_train and ctx > arch.n_ctx_train:
        notes.append(f"--ctx {ctx:,} is beyond the model's training context ({arch.n_ctx_train:,} tokens)")
    if kv_type != "f16":
        notes.append(f"a quantized V ({kv_type}) needs flash attention: llama.cpp refuses it without "
                     "(flash_attn = true)")
        if plan.rotated(arch, kv_type):
            notes.append(f"llama.cpp rotates queries, keys and values for a {kv_type} cache (a Hadamard "
                         "transform that makes the quantization error smaller): a little more compute "
                         "buffer, counted here")
    if mc.engine == "simple" and m.config is not None:
        notes.append(f'[models.{m.name}] has engine = "simple": one request at a time in n_ctx cells; slots and '
                     'kv_tokens apply to engine = "batch"')
    if mc.flash_attn is False and m.config is not None:
        notes.append(f"[models.{m.name}] has flash_attn = false: compute buffers grow with the KV cells without "
                     "it; the plan assumes it on")
    if max(users, best) > plan.MAX_SLOTS:
        notes.append(f"{max(users, best)} users' contexts fit, but slots is at most {plan.MAX_SLOTS}: that many are "
                     "decoded at once and hold KV cells; more requests wait for a slot (capacity, queue_depth)")
    notes.append("compute buffers are an estimate (llama.cpp's graph for a step of step_tokens tokens and "
                 "the logits of every sequence); runtime is the daemon's RSS before it loads a model, as "
                 "measured here; the daemon logs both at start ('memory: ...')")

    return notes


def build(args: argparse.Namespace, config: Config | None = None) -> dict[str, Any]:
    """Everything `onebox plan` prints, as the JSON it prints with --json (`config`: one
    already read, instead of --config)."""
    m = load_model(args, config)
    arch, mc = m.arch, m.config or ModelConfig()
    ctx = args.ctx if args.ctx is not None else mc.n_ctx
    prefix = args.shared_prefix
    if ctx < 64:
        raise BadInput(f"--ctx {ctx}: at least 64 tokens (the least n_ctx onebox takes)")
    if not 0 <= prefix < ctx:
        raise BadInput(f"--shared-prefix {prefix}: from 0 to fewer than --ctx ({ctx}) tokens")
    # Unasked, the configured model's own cache type.
    kv_type = args.kv_type or (mc.kv_type if m.config is not None else "f16")
    try:
        real_cell = plan.bytes_per_cell(arch, kv_type)
        daemon_cell = plan.daemon_bytes_per_cell(arch, kv_type)
    except ValueError as exc:
        given = f"--kv-type {kv_type}" if args.kv_type else f"[models.{m.name}] kv_type {kv_type}"
        raise BadInput(f"{given}: {exc}") from None
    # The daemon checks its own figure at start: plan with the larger one.
    cell = max(real_cell, daemon_cell)
    sizing = plan.Sizing(arch, kv_type, m.weights, mc.step_tokens, mc.cached_prefixes, flash_attn=True,
                         cell_bytes=cell)
    budget, budget_from = _budget(args, m)
    fit = sizing.users_fit(ctx, 0, budget)
    fit_prefix = sizing.users_fit(ctx, prefix, budget) if prefix else None
    # Unasked, plan for as many as fit, up to the slots that can hold them at once.
    best = fit_prefix if fit_prefix is not None else fit
    users = args.users if args.users is not None else max(1, min(best, plan.MAX_SLOTS))
    planned = sizing.for_users(users, ctx, prefix, budget)
    can = users if planned.fits else best

    notes = _notes(m, kv_type, ctx, users, best)
    configured = None
    if m.config is not None:
        try:  # as the daemon will start, with its own kv_type (--kv-type may differ)
            now_cell = plan.daemon_bytes_per_cell(arch, mc.kv_type)
        except ValueError as exc:
            notes.append(f"[models.{m.name}] kv_type {mc.kv_type}: {exc}; the daemon will refuse to start")
        else:
            now = plan.Sizing(arch, mc.kv_type, m.weights, mc.step_tokens, mc.cached_prefixes, mc.flash_attn,
                              cell_bytes=now_cell).memory(mc.kv_tokens, mc.slots,
                                                          memory.budget_bytes(mc.memory_budget_mb))
            configured = {**_memory(now, mc.slots), "kv_type": mc.kv_type}
    recommended = None
    if can > 0:
        settings: dict[str, Any] = plan.recommend(sizing, can, ctx, prefix)
        settings["memory_budget_mb"] = (budget // MIB if budget_from == "--memory"
                                        else mc.memory_budget_mb if m.config is not None else 0)
        if kv_type != "f16" or (m.config is not None and m.config.kv_type != kv_type):
            settings["kv_type"] = kv_type
        settings["flash_attn"] = True
        recommended = {"table": f"models.{m.table}", "users": can, "settings": settings,
                       "toml": _toml(m, settings)}
    return {
        "model": {
            "source": m.source, "name": m.name, "path": str(m.path) if m.path else None,
            "architecture": m.architecture, "description": m.description, "n_layer": arch.n_layer,
            "n_head_kv": list(arch.n_head_kv) if arch.per_layer_heads else arch.n_head_kv[0],
            "key_length": arch.key_length, "value_length": arch.value_length, "n_embd": arch.n_embd or None,
            "n_vocab": arch.n_vocab or None, "n_ctx_train": arch.n_ctx_train or None,
            "sliding_window": ({"n_swa": arch.n_swa, "layers": list(arch.swa_layers) if arch.swa_layers else None}
                               if arch.n_swa else None),
            "weights_bytes": m.weights, "weights_from": m.weights_from,
        },
        "kv_type": kv_type, "bytes_per_token": real_cell, "daemon_bytes_per_cell": daemon_cell,
        "ctx": ctx, "shared_prefix": prefix, "users": users,
        "per_user": {"kv_bytes": ctx * real_cell, "kv_bytes_past_prefix": (ctx - prefix) * real_cell},
        "memory": {**_memory(planned, min(users, plan.MAX_SLOTS)), "budget_from": budget_from,
                   "weights_known": m.weights is not None},
        "fit": {"users": fit, "users_with_prefix": fit_prefix},
        "configured": configured, "recommended": recommended,
        "fits": planned.fits, "estimated": ["compute", "runtime"], "notes": notes,
    }


def _toml(m: Model, settings: dict[str, Any]) -> str:
    lines = [f"[models.{m.table}]"]
    if m.config is None:
        # A JSON string is a valid TOML basic string (the same escapes).
        lines.append(f"path = {json.dumps(m.path_spec)}" if m.path_spec else '# path = "..."  (the GGUF)')
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")  # a bool, number or string in TOML too
        if key == "memory_budget_mb" and value == 0:
            lines[-1] += "  # 0: 80% of this machine's RAM"
    return "\n".join(lines) + "\n"


# -- output ----------------------------------------------------------------------------

def _size(n: int | None) -> str:
    if n is None:
        return f"{'unknown':>18}"
    return f"{n:>18,} B {n / GB:>9.2f} GB {n / GIB:>9.2f} GiB"


def render(r: dict[str, Any]) -> str:
    md, mem = r["model"], r["memory"]
    heads = md["n_head_kv"]
    head_text = f"{heads} KV heads" if isinstance(heads, int) else f"{min(heads)}-{max(heads)} KV heads (per layer)"
    what = (f"{md['description']} ({md['architecture']}, {md['path']})" if md["source"] == "gguf"
            else "explicit architecture")
    kv_type, cell = r["kv_type"], r["bytes_per_token"]
    bytes_text = "2 B" if kv_type == "f16" else f"{KV_TYPES[kv_type][1]}/{KV_TYPES[kv_type][0]} B"
    out = [f"onebox plan: {what}",
           f"  KV per token: {md['n_layer']} layers x {head_text} x ({md['key_length']} + {md['value_length']}) "
           f"x {bytes_text} ({kv_type}) = {cell:,} B ({cell / 1024:.1f} KiB)",
           f"  {r['users']} user(s) x {r['ctx']:,} tokens"
           + (f", {r['shared_prefix']:,} of them a prefix all share" if r["shared_prefix"] else ""), ""]
    rows: list[tuple[str, int | None]] = [(f"KV per user ({r['ctx']:,} tokens)", r["per_user"]["kv_bytes"])]
    if r["shared_prefix"]:
        rows.append(("KV per user past the shared prefix", r["per_user"]["kv_bytes_past_prefix"]))
    rows += [(f"KV, {r['users']} user(s) ({mem['kv_tokens']:,} cells)", mem["kv"]),
             (f"model weights ({md['weights_from']})" if mem["weights_known"] else "model weights",
              mem["model"] if mem["weights_known"] else None),
             ("compute buffers (estimate)", mem["compute"]),
             ("runtime + headroom (estimate)", mem["runtime"] + mem["headroom"]),
             ("total" + ("" if mem["weights_known"] else " without the weights"), mem["total"]),
             (f"budget ({mem['budget_from']})", mem["budget"])]
    width = max(len(label) for label, _ in rows)
    out += [f"  {label:<{width}} {_size(value)}" for label, value in rows]
    short = mem["total"] - mem["budget"]
    out.append(f"  fits: yes, {-short / GIB:.2f} GiB to spare" if r["fits"] else
               f"  fits: NO, {short / GIB:.2f} GiB over the budget")
    fit = f"  users of {r['ctx']:,} tokens that fit the budget: {r['fit']['users']}"
    if r["fit"]["users_with_prefix"] is not None:
        fit += f"; {r['fit']['users_with_prefix']} with the {r['shared_prefix']:,}-token shared prefix"
    out += ["", fit]
    if r["configured"] is not None:
        c = r["configured"]
        kv_text = "" if c["kv_type"] == "f16" else f", kv_type {c['kv_type']}"
        out.append(f"  as configured now ({c['slots']} slots, kv_tokens {c['kv_tokens']:,}{kv_text}): KV {c['kv'] / GIB:.2f} "
                   f"GiB, total {c['total'] / GIB:.2f} GiB of {c['budget'] / GIB:.2f} GiB"
                   + ("" if c["fits"] else ": over, the daemon would refuse to start"))
    out += ["", "notes:"] + [f"  - {n}" for n in r["notes"]]
    rec = r["recommended"]
    if rec is None:
        out += ["", "no [models] table to recommend: not one user fits the budget"]
    else:
        out += ["", f"recommended for {rec['users']} user(s) (add to onebox.toml, then `onebox config check`):",
                rec["toml"].rstrip()]
    return "\n".join(out)


def report_plans(config: Config) -> list[dict[str, str]]:
    """For `onebox report`: each configured model's plan for its slots, as printed."""
    plans = []
    for name, mc in config.models.items():
        title = f"[models.{name}]: {mc.slots} slots x {mc.n_ctx:,} tokens"
        try:
            text = render(build(parser().parse_args(["--model", name, "--users", str(mc.slots)]), config))
        except BadInput as exc:
            text = f"cannot plan: {exc}"
        plans.append({"title": title, "text": text})
    return plans


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onebox plan",
        description=("Plan a model's KV cache: bytes per token (layers x KV heads x key and value head "
                     "dims), memory per user and in total with the weights and compute buffers, how many "
                     "users of a context fit a memory budget (with and without a prefix they share), and "
                     "the [models.NAME] slots, kv_tokens and memory_budget_mb that serve them. The numbers "
                     "add up as the inference daemon's start check does ('memory: ...' in its log). "
                     "Exit 0 when the plan fits, 1 when it does not, 2 for bad input."),
        epilog=("examples: onebox plan --model smollm2 --users 16 --ctx 4K;  "
                "onebox plan --layers 40 --kv-heads 8 --head-dim 128 --ctx 32K --params 20B --memory 64GiB"),
    )
    parser.add_argument("--model", metavar="GGUF|NAME",
                        help="a GGUF file, or a configured [models.NAME] (its file, n_ctx and budget are used)")
    parser.add_argument("--config", help="config file, for --model NAME (default: $ONEBOX_CONFIG, else "
                                         "/etc/onebox/onebox.toml, else this checkout's)")
    arch = parser.add_argument_group("explicit architecture (instead of --model)")
    arch.add_argument("--layers", type=positive, metavar="N", help="transformer layers (block_count)")
    arch.add_argument("--kv-heads", type=positive, metavar="N", help="KV heads per layer (head_count_kv; GQA)")
    arch.add_argument("--head-dim", type=positive, metavar="N", help="dimension of a key head (and value head)")
    arch.add_argument("--value-dim", type=positive, metavar="N", help="dimension of a value head when not --head-dim")
    arch.add_argument("--params", type=parse_params, metavar="COUNT",
                      help="parameter count, e.g. 20B, for the weights' size (with --weight-bits)")
    arch.add_argument("--weight-bits", type=weight_bits, default=16.0, metavar="BITS",
                      help="bits per weight with --params (default 16; about 4.5 for Q4_0, 8.5 for Q8_0)")
    arch.add_argument("--model-bytes", type=parse_bytes, metavar="SIZE", help="the weights' size, e.g. 12GB")
    arch.add_argument("--vocab", type=positive, metavar="N",
                      help=f"vocabulary size, for the logits buffers (default {plan.ASSUMED_VOCAB:,}, Llama 3's)")
    parser.add_argument("--ctx", type=parse_tokens, metavar="N",
                        help="context per user in tokens, e.g. 32768 or 32K (default: the model's n_ctx, else 4096)")
    parser.add_argument("--users", type=positive, metavar="N",
                        help="users served at once (default: as many as fit the budget)")
    parser.add_argument("--kv-type", choices=tuple(KV_TYPES),
                        help="KV cache type: f16 2 B a value, q8_0 34 B and q4_0 18 B per 32 (default: the "
                             "model's kv_type, else f16)")
    parser.add_argument("--memory", type=parse_bytes, metavar="SIZE",
                        help="the budget: 24GiB, 24GB or bytes (default: the model's memory_budget_mb, "
                             "else 80%% of this machine's RAM, as the daemon)")
    parser.add_argument("--shared-prefix", type=parse_tokens, default=0, metavar="TOKENS",
                        help="tokens every user's context starts with (a system prompt): held once for all")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = build(args)
    except BadInput as exc:
        print(f"onebox plan: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

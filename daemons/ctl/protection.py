"""The data-protection facts a GDPR Article 28 review asks a processor for, read from the
box itself: where each kind of data lives and for how long, whether the state directory
is encrypted at rest, who can reach the API socket, which principals may use which
models, and — from the ledger — whether any request left the box, and to whom."""

from __future__ import annotations

import grp
import os
import stat
import time
from pathlib import Path
from typing import Any

from daemons.config import Config
from daemons.ledger import open_ledger
from daemons.ledger.files import key_paths, ledger_path
from daemons.store import StoreError


def data_locations(config: Config) -> list[dict[str, str]]:
    state = config.paths.state
    keys_db, secret = key_paths(config)
    inboxes = ", ".join(f"{name}: {path}" for name, path in config.collection_dirs().items()) or "none configured"
    return [
        {"data": "Documents (originals)", "where": inboxes,
         "kept": "as long as they lie in the inbox folder; onebox never modifies them"},
        {"data": "Retrieval index (chunk text, vectors, full-text index)", "where": str(state / "index.db"),
         "kept": "while the source file is in the inbox: removing the file removes its chunks"},
        {"data": "Markdown cache (extracted text, OCR results)", "where": str(state / "markdown"),
         "kept": "by content hash, until deleted by hand (lets a re-added file skip OCR)"},
        {"data": "Ledger (who called which model, tokens, cost, timings; no prompt or completion text)",
         "where": str(ledger_path(config)), "kept": "no automatic expiry: delete rows with SQLite to shorten it"},
        {"data": "API keys (HMAC-SHA256 hashes only) and their HMAC secret",
         "where": f"{keys_db}, {secret}", "kept": "until revoked (revoked keys stay listed with the revocation time)"},
        {"data": "Logs (daemon events; prompts and completions are not logged)",
         "where": "journald (journalctl -u 'onebox-*') under systemd, the terminal under onebox up",
         "kept": "journald's retention (SystemMaxUse=, MaxRetentionSec= in journald.conf)"},
        {"data": "Provider API keys", "where": "/etc/onebox/credentials/ (root, 0700), passed with LoadCredential=",
         "kept": "until removed; never in the config, the environment, logs or the ledger"},
    ]


def socket_access(config: Config) -> dict[str, Any]:
    path = config.paths.api_socket
    out: dict[str, Any] = {"socket": str(path), "configured_mode": config.router.socket_mode,
                           "configured_group": config.router.socket_group or "(the router's own group)",
                           "tcp": config.router.tcp or "off"}
    try:
        st = path.stat()
    except OSError as exc:
        out["present"] = False
        out["note"] = f"not there now ({exc.strerror}): the router is not running"
        return out
    out["present"] = True
    out["mode"] = f"{stat.S_IMODE(st.st_mode):04o}"
    try:
        group = grp.getgrgid(st.st_gid)
        out["group"] = group.gr_name
        out["group_members"] = sorted(group.gr_mem)
    except KeyError:
        out["group"] = str(st.st_gid)
    return out


def principals(config: Config) -> list[dict[str, Any]]:
    """Every principal with what it may use. Every identified principal may call every
    model; local_only ones never reach a remote model."""
    local = list(config.models) + list(config.embeddings)
    remote = list(config.remote_models)
    rows = []
    names = dict(config.principals)
    names.setdefault("default", config.principal("default"))
    for name, p in sorted(names.items()):
        rows.append({"principal": name, "admin": p.admin, "local_only": p.local_only,
                     "uids": list(p.uids), "groups": list(p.groups),
                     "models": local if p.local_only else local + remote,
                     "budget": f"{p.budget:g} per {p.budget_period}" if p.budget else "none"})
    return rows


def left_the_box(config: Config, since_days: float = 90.0) -> dict[str, Any]:
    """From the ledger: calls served by a provider (not this machine), per provider."""
    path = ledger_path(config)
    since = time.time() - since_days * 86400
    out: dict[str, Any] = {"since_days": since_days, "ledger": str(path)}
    if not path.exists():
        out["note"] = "no ledger yet"
        out["providers"] = []
        return out
    try:
        db = open_ledger(path, readonly=True)
    except StoreError as exc:
        out["note"] = f"cannot read the ledger: {exc}"
        out["providers"] = []
        return out
    try:
        rows = db.rows("SELECT provider, count(*) AS calls, count(DISTINCT principal) AS principals, "
                       "min(at) AS first, max(at) AS last FROM calls WHERE at >= ? AND provider != 'local' "
                       "AND status < 400 GROUP BY provider ORDER BY calls DESC", (since,))
        local = db.value("SELECT count(*) FROM calls WHERE at >= ? AND provider = 'local'", (since,), 0)
    finally:
        db.close()
    out["providers"] = rows
    out["local_calls"] = int(local)
    out["any_left"] = bool(rows)
    return out


def encrypted_at_rest(state: Path, root: Path = Path("/")) -> dict[str, Any]:
    """Whether the state directory's block device sits on dm-crypt (LUKS)."""
    try:
        dev = os.stat(state if state.exists() else state.parent).st_dev
    except OSError as exc:
        return {"known": False, "evidence": f"cannot stat {state}: {exc.strerror}"}
    major, minor = os.major(dev), os.minor(dev)
    seen: list[str] = []
    todo = [root / f"sys/dev/block/{major}:{minor}"]
    while todo:
        node = todo.pop()
        try:
            node = node.resolve()
        except OSError:
            continue
        uuid = node / "dm" / "uuid"
        if uuid.exists():
            value = uuid.read_text().strip()
            seen.append(f"{node.name}: dm uuid {value}")
            if value.startswith("CRYPT-"):
                return {"known": True, "encrypted": True, "evidence": "; ".join(seen)}
        slaves = node / "slaves"
        if slaves.is_dir():
            todo.extend(slaves.iterdir())
        seen.append(node.name)
    if not (root / f"sys/dev/block/{major}:{minor}").exists():
        return {"known": False, "evidence": f"device {major}:{minor} has no block device in /sys (an overlay, "
                                            "tmpfs or network filesystem): cannot tell"}
    return {"known": True, "encrypted": False, "evidence": "no dm-crypt layer under " + " -> ".join(seen)}


def report(config: Config) -> dict[str, Any]:
    return {"locations": data_locations(config), "encryption": encrypted_at_rest(config.paths.state),
            "socket": socket_access(config), "principals": principals(config), "egress": left_the_box(config)}

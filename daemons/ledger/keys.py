"""API keys (keys.db): made by `onebox keys create`, checked by the router on every request.

A key is `ob-<id>-<secret>`: `id` is 8 lowercase hex characters, public (logs, `onebox
keys list` and revocation name a key by it); `secret` is secrets.token_urlsafe(32), 256
random bits. The full key is shown once, at creation, and never stored or logged.

keys.db keeps HMAC-SHA256(server secret, full key), not a slow password hash, on purpose:
- Brute force is already out of reach. A slow KDF (bcrypt, scrypt, argon2) exists to
  stretch low-entropy passwords; against 256 random bits, a billion guesses a second or
  a billion times fewer makes no difference — neither ends before the sun does.
- A KDF is slow by design, ~100 ms a check: on the hot path that is one core spent per
  10 requests/s, and an easy denial of service for anyone sending bad keys.
- The HMAC key is the server secret (keys.secret, 0600, kept outside the database):
  someone who copies keys.db alone cannot even test a guess against it, which a plain
  unkeyed SHA-256 would let them do.

The router checks keys from memory: all active keys by id, reloaded when the
connection's `PRAGMA data_version` moves, which it does whenever another connection (the
`onebox keys` command, writing keys.db directly) commits. Reading it costs microseconds,
so a new or revoked key takes effect on the very next request, with no reload signal.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import apsw

from daemons.ledger import schema
from daemons.store import Database

log = logging.getLogger(__name__)

SECRET_BYTES = 32
PRINCIPAL = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
# token_urlsafe(32) is 32 bytes in unpadded base64url: 43 characters of [A-Za-z0-9_-].
KEY = re.compile(r"ob-([0-9a-f]{8})-([A-Za-z0-9_-]{43})")
MAX_NAME = 200
_ID_TRIES = 8  # 2**32 ids: a clash is rare, a run of them means something else is wrong


class SecretError(Exception):
    """The server secret file cannot be used: the message names the file and the fix."""


def load_secret(path: Path) -> bytes:
    """The 32-byte HMAC key in `path`, created (0600) if there is none. Refuses a file that
    group or others may access, or that does not hold exactly 32 bytes."""
    path = Path(path)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL with mode 0600: the bytes are never, even for a moment, in a file anyone else
    # can open. Written in full and synced before it appears under its name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
            f.flush()
            os.fsync(f.fileno())
        # A hard link, not os.replace: both publish atomically, but replace would overwrite
        # the secret of a process that created it concurrently (a daemon and a command at
        # first start) after it began using it. Losing that race, we read the winner's.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
            log.info("created the API key secret %s", path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _sync_dir(path.parent)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SecretError(f"{path}: the API key secret must be a regular file")
        if mode & 0o077:
            raise SecretError(f"{path}: the API key secret is accessible to group or others "
                              f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}")
        data = f.read(SECRET_BYTES + 1)
    if len(data) != SECRET_BYTES:
        raise SecretError(f"{path}: the API key secret must hold exactly {SECRET_BYTES} bytes, not "
                          f"{len(data) if len(data) <= SECRET_BYTES else 'more'}; move it away to make a new "
                          "one (every key made with it stops working)")
    return data


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KeyInfo:
    """What is known of a key without its secret: safe to log, list and return."""

    id: str
    principal: str
    name: str
    created_at: float
    revoked_at: float | None
    last4: str

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def public(self) -> dict[str, Any]:
        """For `onebox keys list` and /v1/keys: the fields above, a hint to recognise the key
        by, never its hash or secret."""
        return {**asdict(self), "revoked": self.revoked, "hint": f"ob-{self.id}-...{self.last4}"}


_COLUMNS = "id, principal, name, created_at, revoked_at, last4"


def _info(row: tuple[Any, ...]) -> KeyInfo:
    return KeyInfo(str(row[0]), str(row[1]), str(row[2]), float(row[3]),
                   None if row[4] is None else float(row[4]), str(row[5]))


class KeyStore:
    """keys.db through one connection; safe to share between threads (one lock)."""

    def __init__(self, db: Database, secret: bytes) -> None:
        if len(secret) < SECRET_BYTES:
            raise SecretError(f"the API key secret must be at least {SECRET_BYTES} bytes")
        if db.readonly:
            db.check_migrated(schema.KEY_MIGRATIONS)
        else:
            db.migrate(schema.KEY_MIGRATIONS)
        self.db = db
        self._secret = secret
        self._lock = threading.Lock()
        # Active keys by id, with their hash. By id, not by hash: the lookup is then on
        # what the caller sent in the clear, and the one secret-dependent comparison is
        # hmac.compare_digest's, in constant time.
        self._active: dict[str, tuple[bytes, KeyInfo]] = {}
        self._version: int | None = None  # data_version the cache was loaded at; None: load

    def _hash(self, key: str) -> bytes:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).digest()

    # ---- the hot path --------------------------------------------------------------

    def authenticate(self, key: str) -> KeyInfo | None:
        """The key's info, or None if it is malformed, unknown or revoked."""
        m = KEY.fullmatch(key)
        if m is None:
            return None
        digest = self._hash(key)
        with self._lock:
            self._refresh()
            found = self._active.get(m.group(1))
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    def _refresh(self) -> None:
        """Reload the active keys if another connection committed since (caller holds the lock)."""
        version = int(self.db.value("PRAGMA data_version"))
        if version == self._version:
            return
        self._active = {str(r[0]): (bytes(r[6]), _info(r)) for r in self.db.all(
            f"SELECT {_COLUMNS}, hash FROM keys WHERE revoked_at IS NULL")}
        self._version = version
        log.debug("keys: %d active", len(self._active))

    # ---- management (`onebox keys`, /v1/keys) ------------------------------------------

    def create(self, principal: str, name: str = "") -> tuple[KeyInfo, str]:
        """A new key for `principal`: its info and the full key, which exists nowhere else
        once this returns."""
        if not PRINCIPAL.fullmatch(principal):
            raise ValueError(f"principal {principal!r}: expected 1 to 64 of A-Z a-z 0-9 _ . : @ -")
        if len(name) > MAX_NAME or any(not c.isprintable() for c in name):
            raise ValueError(f"key name: at most {MAX_NAME} printable characters")
        for _ in range(_ID_TRIES):
            key_id = secrets.token_hex(4)
            secret = secrets.token_urlsafe(SECRET_BYTES)
            key = f"ob-{key_id}-{secret}"
            info = KeyInfo(key_id, principal, name, time.time(), None, secret[-4:])
            try:
                with self._lock, self.db.transaction():
                    self.db.execute("INSERT INTO keys (id, principal, name, hash, created_at, revoked_at, last4) "
                                    "VALUES (?, ?, ?, ?, ?, NULL, ?)",
                                    (info.id, info.principal, info.name, self._hash(key), info.created_at,
                                     info.last4))
                    # This connection's own commits leave its data_version alone: reload next time.
                    self._version = None
            except apsw.ConstraintError:
                continue  # that id is taken
            log.info("keys: created key %s for %s", info.id, principal)
            return info, key
        raise RuntimeError(f"keys: no free key id after {_ID_TRIES} tries")

    def revoke(self, key_id: str) -> KeyInfo | None:
        """Revoke a key (again is fine: the first time stays); None if there is no such key."""
        with self._lock, self.db.transaction():
            self.db.execute("UPDATE keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?", (time.time(), key_id))
            self._version = None
            row = self.db.one(f"SELECT {_COLUMNS} FROM keys WHERE id = ?", (key_id,))
        if row is None:
            return None
        log.info("keys: revoked key %s of %s", key_id, row[1])
        return _info(row)

    def get(self, key_id: str) -> KeyInfo | None:
        with self._lock:
            row = self.db.one(f"SELECT {_COLUMNS} FROM keys WHERE id = ?", (key_id,))
        return None if row is None else _info(row)

    def list(self, include_revoked: bool = False) -> builtins.list[KeyInfo]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._lock:
            rows = self.db.all(f"SELECT {_COLUMNS} FROM keys{where} ORDER BY created_at, id")
        return [_info(r) for r in rows]

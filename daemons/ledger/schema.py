"""ledger.db and keys.db: their tables (named migrations, daemons/store.py).

ledger.db
- `calls`: one row per call the router answered (or failed), written in batches by the
  router's ledger thread (write.py): who (`principal`, its admission class), what was
  asked (`model`, `kind`) and who answered (`provider`: "local" or an upstream's name;
  `served_by`: the model that really answered, which differs from `model` after a
  fallback), the tokens (NULL where the answer did not say, e.g. a call that failed
  before any), the `cost` in the configured currency, time to first token and duration,
  and the HTTP `status` with its `error`; `user`, the request's OpenAI `user` field as
  the client sent it (NULL when it sent none; 0002). `at` is when the call started (unix time):
  usage reports and budgets select on it, alone or per principal, hence the two indexes.

keys.db
- `keys`: the API keys (keys.py). Only an HMAC of each key is kept (`hash`, unique: the
  lookup a request makes), with its short public `id` (the one thing logs name), its
  principal, a label, and its last four characters so a person can tell keys apart.
  Revoking sets `revoked_at`; the row stays, so the ledger's history still has a key to
  point at and a revoked key can be listed.
"""

from __future__ import annotations

from pathlib import Path

from daemons.store import Database, Migration

MIGRATIONS = (
    Migration("0001-calls", """
CREATE TABLE calls (
  id INTEGER PRIMARY KEY,
  request_id TEXT NOT NULL,
  at REAL NOT NULL,
  principal TEXT NOT NULL,
  principal_class TEXT NOT NULL,
  model TEXT NOT NULL,
  provider TEXT NOT NULL,
  served_by TEXT NOT NULL,
  kind TEXT NOT NULL,
  prompt_tokens INTEGER,
  completion_tokens INTEGER,
  cached_tokens INTEGER,
  cost REAL NOT NULL,
  ttft_s REAL,
  duration_s REAL NOT NULL,
  status INTEGER NOT NULL,
  error TEXT
);
CREATE INDEX calls_at ON calls (at);
CREATE INDEX calls_principal_at ON calls (principal, at);
"""),
    Migration("0002-calls-user", """
ALTER TABLE calls ADD COLUMN user TEXT;
"""),
)

KEY_MIGRATIONS = (
    Migration("0001-keys", """
CREATE TABLE keys (
  id TEXT PRIMARY KEY,
  principal TEXT NOT NULL,
  name TEXT NOT NULL DEFAULT '',
  hash BLOB NOT NULL UNIQUE,
  created_at REAL NOT NULL,
  revoked_at REAL,
  last4 TEXT NOT NULL
);
"""),
)

# The columns of `calls` a CallRecord fills, in its field order (write.py checks they match).
CALL_COLUMNS = ("request_id", "at", "principal", "principal_class", "model", "provider", "served_by", "kind",
                "prompt_tokens", "completion_tokens", "cached_tokens", "cost", "ttft_s", "duration_s", "status",
                "error", "user")


def open_ledger(path: Path | str, *, readonly: bool = False) -> Database:
    """ledger.db, migrated (or, read-only, checked to be)."""
    return Database(path, readonly=readonly, migrations=MIGRATIONS)


def open_keys(path: Path | str, *, readonly: bool = False) -> Database:
    """keys.db, migrated (or, read-only, checked to be)."""
    return Database(path, readonly=readonly, migrations=KEY_MIGRATIONS)

"""The router's books: ledger.db, what every call cost (write.py: the router's one writer,
batched off the event loop; usage.py: the reports), and keys.db, the API keys callers
present (keys.py). Both tables are in schema.py."""

from daemons.ledger.keys import KeyInfo, KeyStore, SecretError, load_secret
from daemons.ledger.schema import KEY_MIGRATIONS, MIGRATIONS, open_keys, open_ledger
from daemons.ledger.usage import parse_since, report, totals, usage
from daemons.ledger.write import CallRecord, Ledger

__all__ = [
    "KEY_MIGRATIONS", "MIGRATIONS", "CallRecord", "KeyInfo", "KeyStore", "Ledger", "SecretError", "load_secret",
    "open_keys", "open_ledger", "parse_since", "report", "totals", "usage",
]

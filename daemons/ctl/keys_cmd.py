"""`onebox keys create|list|revoke`: API keys for callers over TCP (and Unix-socket users
that [auth] unix_unlisted = "key" asks for one).

Through the router's admin endpoints when it runs (an admin: root or the onebox user on
its Unix socket, or an admin principal's key in $ONEBOX_API_KEY with --url); when it
does not answer, on keys.db directly — a running router sees those changes on its next
request too (it checks the database's data_version on every lookup)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from daemons.config import Config, ConfigError
from daemons.ctl import api
from daemons.ctl.api import APIError
from daemons.ledger import KeyStore, SecretError, load_secret, open_keys
from daemons.ledger.files import key_paths
from daemons.store import StoreError

SECTIONS = ("paths", "collections", "auth")
COLUMNS = ("id", "principal", "name", "created", "revoked", "ends_with")


def when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + "Z"


def table(keys: list[dict[str, Any]]) -> str:
    rows = [list(COLUMNS)] + [[str(k["id"]), str(k["principal"]), str(k.get("name") or ""), when(k.get("created_at")),
                               when(k.get("revoked_at")), "..." + str(k.get("last4", ""))] for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def offline(config: Config, work: Callable[[KeyStore], Any]) -> Any:
    """Run `work` on keys.db itself (the router is not running)."""
    db_path, secret_path = key_paths(config)
    db = open_keys(db_path)
    try:
        return work(KeyStore(db, load_secret(secret_path)))
    finally:
        db.close()


def run(args: argparse.Namespace) -> Any:
    config = api.load_config(args.config, SECTIONS) if not args.url else None
    try:
        with api.API(api.Endpoint.of(config, args.url)) as client:
            if args.action == "create":
                return client.json("POST", "/v1/keys", json={"principal": args.principal, "name": args.name})
            if args.action == "list":
                return client.json("GET", "/v1/keys", params={"revoked": str(args.all).lower()})["data"]
            return client.json("DELETE", f"/v1/keys/{args.id}")
    except APIError as exc:
        if exc.reachable or config is None:
            raise
        print(f"onebox keys: the router is not answering ({exc.message}); using {key_paths(config)[0]} directly",
              file=sys.stderr)
    if args.action == "create":
        def create(store: KeyStore) -> dict[str, Any]:
            info, key = store.create(args.principal, args.name)
            return {**info.public(), "key": key}
        return offline(config, create)
    if args.action == "list":
        return offline(config, lambda s: [k.public() for k in s.list(args.all)])
    info = offline(config, lambda s: s.revoke(args.id))
    if info is None:
        raise APIError(f"no API key with id {args.id!r}")
    return info.public()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="onebox keys",
        description="Manage API keys. A key names a principal ([principals.NAME] gives its limits, else "
                    "[principals.default]); it is stored hashed, and shown once, when it is created.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="make a key for a principal and print it (once)",
                       description="Make a key for PRINCIPAL and print it. It is shown only this once.")
    c.add_argument("principal", help="who the key identifies (letters, digits, _ . : @ -)")
    c.add_argument("--name", default="", help="a label for the key (who holds it, what for)")
    c.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    ls = sub.add_parser("list", help="list keys (never their secrets)", description="List keys: id, principal, "
                        "label, when created and revoked, and the last 4 characters of each.")
    ls.add_argument("--all", action="store_true", help="revoked keys too")
    ls.add_argument("--json", action="store_true", help="print the list as JSON")
    r = sub.add_parser("revoke", help="revoke a key at once", description="Revoke key ID: the next request "
                       "with it gets 401.")
    r.add_argument("id", help="the key's id (onebox keys list)")
    r.add_argument("--json", action="store_true", help="print the revoked key's record as JSON")
    for sp in (c, ls, r):
        api.add_arguments(sp)
    args = p.parse_args(argv)
    try:
        result = run(args)
    except (ConfigError, APIError) as exc:
        return api.failure("onebox keys", exc)
    except (StoreError, SecretError, ValueError, OSError) as exc:
        print(f"onebox keys: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.action == "create":
        print(result["key"])
        print(f"key {result['id']} for principal {result['principal']}: store it now, it is not shown again",
              file=sys.stderr)
    elif args.action == "list":
        print(table(result) if result else "no keys")
    else:
        print(f"revoked key {result['id']} of principal {result['principal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

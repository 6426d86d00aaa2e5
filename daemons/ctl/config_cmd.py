"""`onebox config check|defaults`: validate the config file, or print the defaults."""

from __future__ import annotations

import argparse
import sys

from daemons import config as config_mod
from daemons.config import ConfigError

EX_CONFIG = 78


def check(path: str | None) -> int:
    try:
        config = config_mod.load(path)
    except ConfigError as exc:
        print(f"onebox: {len(exc.errors)} error(s):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return EX_CONFIG
    models = ", ".join(config.models) or "none"
    print(f"{config.source}: ok (models: {models})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox config",
        description=("check: read the config file as every daemon would and print every error with its key "
                     "(exit 78 if any); run it after each edit, before restarting units. defaults: print the "
                     "documented default config (the file a new box starts from)."),
    )
    parser.add_argument("action", choices=["check", "defaults"])
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG or /etc/onebox/onebox.toml)")
    args = parser.parse_args(argv)
    if args.action == "defaults":
        sys.stdout.write(config_mod.render_defaults())
        return 0
    return check(args.config)


if __name__ == "__main__":
    sys.exit(main())

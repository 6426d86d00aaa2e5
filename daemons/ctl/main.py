"""The `onebox` command: one entry point for the daemons and the tools around them."""

from __future__ import annotations

import argparse
import sys

from daemons import __version__, registry

# The tools; every registered daemon is a subcommand too (daemons/registry.py).
TOOLS = {
    "up": ("daemons.ctl.up", "run the suite in the foreground (development)"),
    "config": ("daemons.ctl.config_cmd", "check the config file, or print the documented defaults"),
    "models": ("daemons.ctl.models_cmd", "list the configured models and their files, or convert one to GGUF"),
    "tune": ("daemons.ctl.tune", "write systemd drop-ins and kernel parameters for this box's CPUs"),
    "ingest": ("daemons.ctl.ingest_cmd", "copy files into a collection's inbox and wait until they are indexed"),
    "search": ("daemons.ctl.search_cmd", "search the indexed documents"),
    "documents": ("daemons.ctl.documents_cmd", "list the indexed documents and the files waiting, with their status"),
    "keys": ("daemons.ctl.keys_cmd", "create, list and revoke API keys"),
    "usage": ("daemons.ctl.usage_cmd", "what each principal, model or day used and cost (the ledger)"),
    "status": ("daemons.ctl.status_cmd", "the suite on one screen: daemons, models, queues, today's usage"),
    "plan": ("daemons.ctl.plan_cmd", "plan KV-cache memory: users that fit a budget and the [models] table for them"),
    "doctor": ("daemons.ctl.doctor_cmd", "check the host (kernel, cgroups, real-time, disk, GPU, memory) and say "
                                         "what to change"),
    "loadtest": ("daemons.ctl.loadtest_cmd", "ramp simulated users against the running suite and find where it "
                                             "breaks"),
    "backup": ("daemons.ctl.backup_cmd", "an online backup of the databases, config, markdown cache and keys"),
    "restore": ("daemons.ctl.restore_cmd", "bring a backup back onto a fresh install"),
    "report": ("daemons.ctl.report_cmd", "one HTML page to hand on: doctor, plan, tune, load test, data protection"),
    "mcp": ("daemons.ctl.mcp_cmd", "serve the Model Context Protocol on stdio (search and read the documents)"),
}
COMMANDS = {**{d.cmd: (d.module, d.summary) for d in registry.DAEMONS}, **TOOLS}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="onebox",
        description="onebox: a private AI stack for one Linux box. Run 'onebox COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"onebox {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help for -h, an error for an unknown command
        parser.print_help()
        return 2
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main())

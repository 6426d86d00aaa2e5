"""`onebox doctor`: check this host against what the daemons need and say what to change.

The checks live in daemons/doctor/ (one module per area). What they need from the other
commands is brought to them from here: the topology and recommendations of `onebox tune`
(`placement()`) and the memory plan of `onebox plan` (`estimate()`), so that package
never imports daemons.ctl. It runs unprivileged: what it cannot read is skipped, and
said so. Exit 0 when nothing failed, 1 when something did.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from daemons import models
from daemons.config import Config, ConfigError
from daemons.ctl import api, tune
from daemons.doctor import report
from daemons.doctor.memory import Estimate
from daemons.doctor.placement import Gpu, Placement
from daemons.infer import memory

SECTIONS = ("paths", "models")


def placement(topo: tune.Topology) -> Placement:
    """What onebox tune reads and recommends for `topo`, for the checks."""
    p = tune.plan(topo)
    return Placement(
        describe=topo.describe(), node_of={c.id: c.node for c in topo.cpus}, node=p.node,
        node_cores=len(topo.cores(p.node)), min_cores=tune.MIN_CORES_TO_ISOLATE, isolate=frozenset(p.isolate),
        housekeeping=frozenset(p.housekeeping), infer=frozenset(p.infer), feeder_priority=p.feeder_priority,
        kernel_line=tune.kernel_cmdline(topo, p).splitlines()[-1] if p.isolate else "",
        gpus=tuple(Gpu(g.name, g.bus, g.node) for g in topo.gpus), fmt=tune.fmt)


def read_placement(root: Path) -> Placement:
    # nvidia_smi=False: the doctor reads /proc and /sys only and never shells out.
    return placement(tune.read_topology(root, nvidia_smi=False))


def estimate(config: Config) -> list[Estimate]:
    """What each [models.NAME] daemon will plan for, as `onebox plan` computes its
    "configured" plan: tensor bytes and KV shape from the GGUF header, cells x bytes per
    cell as the daemon counts them, compute buffers estimated from llama.cpp's graph.
    The one place to swap for another estimate; the planner is imported here so that a
    build without it skips the memory checks instead of failing."""
    try:
        from daemons import plan
        from daemons.gguf_header import GgufError, arch_of, read_header
    except ImportError as exc:
        return [Estimate(key, None, f"no planner here ({exc})") for key in config.models]
    out = []
    for key, mc in config.models.items():
        try:
            path = models.resolve(mc.path, config.paths.models)
            header = read_header(path)
            arch = arch_of(header.metadata)
            cell = plan.daemon_bytes_per_cell(arch, mc.kv_type)
        except (FileNotFoundError, GgufError) as exc:
            out.append(Estimate(key, None, str(exc)))
            continue
        except ValueError as exc:  # the daemon refuses to start with it
            out.append(Estimate(key, None, f"kv_type {mc.kv_type}: {exc}"))
            continue
        # The simple engine's llama-cpp-python context holds n_ctx cells for one sequence.
        cells, slots = (mc.kv_tokens, mc.slots) if mc.engine == "batch" else (mc.n_ctx, 1)
        sizing = plan.Sizing(arch, mc.kv_type, header.tensor_bytes or path.stat().st_size, mc.step_tokens,
                             mc.cached_prefixes, mc.flash_attn, cell_bytes=cell)
        out.append(Estimate(key, sizing.memory(cells, slots, memory.budget_bytes(mc.memory_budget_mb))))
    return out


def report_rows(config: Config, root: Path = Path("/")) -> list[dict[str, str]]:
    """The checks as rows (area, name, status, evidence, fix), for `onebox report`."""
    return [r.as_dict() for r in report.run(root, read_placement(root), config, estimate(config))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox doctor",
        description=("Check this host for onebox and say what to change and why: CPU isolation on the kernel "
                     "command line (isolcpus=, nohz_full=, rcu_nocbs=), transparent huge pages, swap, systemd "
                     "and cgroup v2 (whether CPUWeight= and AllowedCPUs= are enforced), the feeder's real-time "
                     "permission, the state directory's filesystem, mount options, I/O scheduler and dm-crypt, "
                     "the GPU's NUMA node and PCIe link, and free memory against the models' plan. Each check "
                     "is ok, warn, fail or skipped (with why), with its evidence and fix. Reads /proc and /sys "
                     "only and needs no privilege. Exit status 1 if any check fails."),
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--config", help="config file (default: $ONEBOX_CONFIG, else /etc/onebox/onebox.toml, "
                                         "else this checkout's)")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="read /proc, /sys and /etc under this directory instead of / (for testing)")
    args = parser.parse_args(argv)
    config: Config | None = None
    error = ""
    try:
        config = api.load_config(args.config, SECTIONS)
    except ConfigError as exc:
        error = f"config error: {exc}"
    box = read_placement(args.root)
    results = report.run(args.root, box, config, estimate(config) if config else [], error)
    host = f"{socket.gethostname()}: {box.describe}"
    if args.json:
        print(report.as_json(results, {"host": host, "config": config.source if config else None}))
    else:
        print(report.render(results, f"onebox doctor: {host}; config {config.source if config else '(unreadable)'}"))
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""`onebox tune`: turn this box's CPU/NUMA/GPU topology into systemd drop-ins.

Reads /sys/devices/system/cpu (cores, SMT siblings), /sys/devices/system/node (NUMA)
and /proc/driver/nvidia (or nvidia-smi) for GPUs, decides where each daemon runs, and
writes, under --emit DIR:
  onebox-infer@.service.d/tune.conf    CPUAffinity=/AllowedCPUs=/CPUWeight= for inference,
                                       and the feeder thread's CPU and SCHED_FIFO priority
  onebox-router.service.d/tune.conf    the router on the housekeeping CPUs
  UNIT.d/tune.conf                     each background daemon (daemons/registry.py), lowest weight
  onebox-kernel-cmdline.txt                   irqaffinity=/nohz_full=/rcu_nocbs= (and why no isolcpus=)
The feeder settings go in as ONEBOX__MODELS__<instance>__FEEDER_* environment
overrides in the drop-in, so the tuning lives with the other systemd placement and the
admin's versioned onebox.toml is left alone (a value set there is overridden; delete the
drop-in to go back to it).

The policy (`plan()`) is a pure function of the topology, so it is tested on fake
sysfs trees and can describe a larger box than this one.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from daemons import cpu, registry

# Below this many physical cores, isolating one for the feeder starves everything else.
MIN_CORES_TO_ISOLATE = 4
FEEDER_PRIORITY = 10
WEIGHTS = {"infer": 1000, "router": 200, "background": 50}


@dataclass(frozen=True)
class Cpu:
    id: int
    core: tuple[int, int]  # (package, core_id): SMT siblings share it
    node: int


@dataclass(frozen=True)
class Gpu:
    name: str
    bus: str
    node: int


@dataclass(frozen=True)
class Topology:
    cpus: tuple[Cpu, ...]
    gpus: tuple[Gpu, ...] = ()

    @property
    def nodes(self) -> list[int]:
        return sorted({c.node for c in self.cpus})

    def cores(self, node: int | None = None) -> list[list[int]]:
        """Physical cores (lists of SMT sibling CPU ids), in CPU order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for c in sorted(self.cpus, key=lambda c: c.id):
            if node is None or c.node == node:
                groups.setdefault(c.core, []).append(c.id)
        return sorted(groups.values(), key=lambda g: g[0])

    def describe(self) -> str:
        smt = len(self.cpus) // max(1, len(self.cores()))
        gpus = ", ".join(f"{g.name} ({g.bus}, node {g.node})" for g in self.gpus) or "no GPU"
        return (f"{len(self.cpus)} CPUs, {len(self.cores())} cores ({smt} thread(s) per core), "
                f"{len(self.nodes)} NUMA node(s); {gpus}")


@dataclass
class Plan:
    housekeeping: list[int]   # OS, IRQs, router
    background: list[int]     # embed, ocr, ingest
    infer: list[int]          # inference daemons (llama.cpp threads)
    feeder: list[int]         # the decode thread, inside `infer`
    isolate: list[int]        # nohz_full/rcu_nocbs on the kernel command line; empty when too small
    threads: int              # llama.cpp threads for a model
    feeder_priority: int
    node: int
    notes: list[str] = field(default_factory=list)


def fmt(cpus: list[int] | set[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the syntax of CPUAffinity=, AllowedCPUs=, isolcpus=)."""
    out: list[str] = []
    ids = sorted(cpus)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


# -- reading the topology ------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_topology(root: Path = Path("/"), nvidia_smi: bool = True) -> Topology:
    sysfs = root / "sys" / "devices" / "system"
    online_text = _read(sysfs / "cpu" / "online")
    online = sorted(cpu.parse_cpus(online_text)) if online_text else sorted(cpu.online_cpus())
    node_of: dict[int, int] = {}
    for node_dir in sorted((sysfs / "node").glob("node[0-9]*")):
        for c in cpu.parse_cpus(_read(node_dir / "cpulist") or ""):
            node_of[c] = int(node_dir.name[4:])
    cpus = []
    for c in online:
        topo = sysfs / "cpu" / f"cpu{c}" / "topology"
        package = int(_read(topo / "physical_package_id") or 0)
        core_id = int(_read(topo / "core_id") or c)
        cpus.append(Cpu(c, (package, core_id), node_of.get(c, 0)))
    return Topology(tuple(cpus), tuple(read_gpus(root, nvidia_smi)))


def read_gpus(root: Path, nvidia_smi: bool = True) -> list[Gpu]:
    gpus: list[tuple[str, str]] = []
    for info in sorted((root / "proc" / "driver" / "nvidia" / "gpus").glob("*/information")):
        fields = dict(re.findall(r"^([^:]+):\s*(.*)$", info.read_text(), re.M))
        gpus.append((fields.get("Model", "NVIDIA GPU").strip(), fields.get("Bus Location", info.parent.name).strip()))
    if not gpus and nvidia_smi and root == Path("/") and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,pci.bus_id", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for line in out.splitlines():
            name, _, bus = line.partition(",")
            if bus.strip():
                gpus.append((name.strip(), bus.strip()))
    result = []
    for name, bus in gpus:
        # nvidia-smi says 00000000:01:00.0, sysfs 0000:01:00.0
        pci = bus.lower()[-12:]
        node_text = _read(root / "sys" / "bus" / "pci" / "devices" / pci / "numa_node")
        node = int(node_text) if node_text and node_text.lstrip("-").isdigit() else 0
        result.append(Gpu(name, pci, max(node, 0)))
    return result


# -- the policy ----------------------------------------------------------------------

def plan(topo: Topology) -> Plan:
    # Inference lives on one NUMA node (its memory is local there): the GPU's when that
    # node has CPUs (a GPU can hang off a CPU-less node), else the first node.
    gpu_node = topo.gpus[0].node if topo.gpus else None
    node = gpu_node if gpu_node is not None and topo.cores(gpu_node) else topo.nodes[0]
    cores = topo.cores(node)
    all_cpus = sorted(c.id for c in topo.cpus)
    other_nodes = sorted(c.id for c in topo.cpus if c.node != node)
    # CPUs are handed out from `node` only, so that node's cores decide, not the box's.
    if len(cores) < MIN_CORES_TO_ISOLATE:
        return Plan(
            housekeeping=all_cpus, background=all_cpus, infer=all_cpus, feeder=all_cpus, isolate=[],
            threads=len(topo.cores()), feeder_priority=0, node=node,
            notes=[f"{len(cores)} core(s) on node {node}: too few to set any aside. Everything shares every CPU, "
                   "ordered by CPUWeight= (inference 1000, router 200, background 50). The feeder "
                   "gets no SCHED_FIFO priority from here: a real-time thread on one of two cores would "
                   "starve the router and the OS on it. No kernel parameters."],
        )
    # One core (two, from 16 up) for the OS, IRQs and the router; the rest of the node is
    # inference: the feeder and llama.cpp's threads share it (they inherit its mask).
    n_house = 2 if len(cores) >= 16 else 1
    housekeeping = sorted(c for core in cores[:n_house] for c in core)
    infer_cores = cores[n_house:]
    infer = sorted(c for core in infer_cores for c in core)
    notes = [
        f"housekeeping (OS, IRQs, router): CPUs {fmt(housekeeping)} of node {node}",
        f"inference: CPUs {fmt(infer)} of node {node}, {len(infer_cores)} llama.cpp threads "
        "(one per physical core: SMT siblings add little to matrix work)",
        f"feeder: on the inference CPUs at SCHED_FIFO {FEEDER_PRIORITY}; not on one core of its own, because "
        "llama.cpp's compute threads are started by the feeder and inherit its CPU mask",
        "kernel: IRQs on the housekeeping CPUs, no timer tick and no RCU callbacks on the inference CPUs",
    ]
    if other_nodes:
        notes.append(f"background (embed, ocr, ingest): the other node(s), CPUs {fmt(other_nodes)}, "
                     "so document work never competes with inference for memory bandwidth")
    else:
        notes.append(f"background (embed, ocr, ingest): the housekeeping CPUs {fmt(housekeeping)}, at the "
                     "lowest weight")
    return Plan(
        housekeeping=housekeeping,
        background=other_nodes or housekeeping,
        infer=infer,
        feeder=infer,
        isolate=infer,
        threads=len(infer_cores),
        feeder_priority=FEEDER_PRIORITY,
        node=node,
        notes=notes,
    )


def example_topology(cores: int = 16, threads_per_core: int = 2, nodes: int = 1) -> Topology:
    """A synthetic box, for `onebox tune --example` and for saying what a bigger box gets."""
    cpus = []
    per_node = cores // nodes
    for t in range(threads_per_core):
        for core in range(cores):
            cpus.append(Cpu(t * cores + core, (core // per_node, core), core // per_node))
    return Topology(tuple(cpus))


# -- writing the drop-ins ------------------------------------------------------------

def header(topo: Topology) -> str:
    return (f"# Written by `onebox tune` on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M')} for\n"
            f"# {topo.describe()}.\n# Re-run it after hardware changes; delete this file to undo.\n")


def render(topo: Topology, p: Plan, daemons: Sequence[registry.Daemon] = registry.DAEMONS) -> dict[str, str]:
    """File name (relative to the emit dir) -> content: a drop-in for each registered
    daemon's unit, by its placement, and the kernel command line."""
    head = header(topo)
    files: dict[str, str] = {}
    for d in daemons:
        text = {"infer": _infer, "router": _router, "background": _background}[d.placement](topo, p)
        files[f"{d.unit}.d/tune.conf"] = head + "\n".join(text) + "\n"
    files["onebox-kernel-cmdline.txt"] = kernel_cmdline(topo, p)
    return files


def _infer(topo: Topology, p: Plan) -> list[str]:
    infer = ["[Service]",
             f"# Inference on node {p.node}'s CPUs {fmt(p.infer)}. CPUAffinity= pins the processes;",
             "# AllowedCPUs= is the same as a cgroup cpuset, enforced where cpuset is on cgroup v2.",
             f"CPUAffinity={fmt(p.infer)}", f"AllowedCPUs={fmt(p.infer)}",
             "# The request path: the highest weight in onebox.slice (weights, never CPUQuota=).",
             f"CPUWeight={WEIGHTS['infer']}",
             "# The decode (\"feeder\") thread and llama.cpp threads, as config overrides for this",
             "# instance (models.<instance>.*); onebox.toml is left as the admin wrote it. With several",
             "# models, copy this to onebox-infer@MODEL.service.d/ and split the CPUs between them.",
             "# (Model keys with '-' or '.' are not valid variable names: set those in onebox.toml.)",
             "# The CPU list is quoted: an override is read as a TOML value, and 15 alone is a number.",
             f'Environment="ONEBOX__MODELS__%i__FEEDER_CPUS=\\"{fmt(p.feeder)}\\""',
             f"Environment=ONEBOX__MODELS__%i__THREADS={p.threads}"]
    if p.feeder_priority:
        infer += [f"Environment=ONEBOX__MODELS__%i__FEEDER_PRIORITY={p.feeder_priority}"]
    else:
        infer += ["# No SCHED_FIFO priority here: too few cores (the config's feeder_priority still applies)."]
    if topo.gpus:
        infer += ["# GPU(s) found: the unit's PrivateDevices= would hide them. The CUDA driver JIT-compiles",
                  "# kernels into executable memory, which MemoryDenyWriteExecute= forbids.",
                  "PrivateDevices=no", "MemoryDenyWriteExecute=no",
                  "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=/dev/nvidia-uvm rw",
                  "DeviceAllow=/dev/nvidia-uvm-tools rw"]
        infer += [f"DeviceAllow=/dev/nvidia{i} rw" for i in range(len(topo.gpus))]
    return infer


def _router(topo: Topology, p: Plan) -> list[str]:
    return ["[Service]",
            f"# The router shares the housekeeping CPUs {fmt(p.housekeeping)} with the OS: it is mostly",
            "# waiting on sockets, and must never be starved by the model.",
            f"CPUAffinity={fmt(p.housekeeping)}", f"AllowedCPUs={fmt(p.housekeeping)}",
            f"CPUWeight={WEIGHTS['router']}"]


def _background(topo: Topology, p: Plan) -> list[str]:
    return ["[Service]",
            f"# Background work (documents, OCR, embeddings) on CPUs {fmt(p.background)}, lowest weight:",
            "# it yields to requests at once, yet uses every idle cycle (no CPUQuota=).",
            f"CPUAffinity={fmt(p.background)}", f"AllowedCPUs={fmt(p.background)}",
            f"CPUWeight={WEIGHTS['background']}"]


def kernel_cmdline(topo: Topology, p: Plan) -> str:
    lines = [f"# Kernel command line `onebox tune` recommends for {topo.describe()}.",
             "# Add it to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub, reboot."]
    if not p.isolate:
        lines += ["# Nothing: with fewer than "
                  f"{MIN_CORES_TO_ISOLATE} cores, a core set aside would be missed more than it helps.", ""]
        return "\n".join(lines)
    iso = fmt(p.isolate)
    house = fmt(p.housekeeping)
    lines += [
        f"# irqaffinity={house}: device interrupts go to the housekeeping CPUs, not the inference ones.",
        f"# nohz_full={iso}: no scheduler tick on a CPU that runs one inference thread alone (fewer",
        "#   interruptions per decode step).",
        f"# rcu_nocbs={iso}: RCU callbacks run on the housekeeping CPUs instead.",
        "# No isolcpus=: it turns off load balancing on those CPUs, and llama.cpp's unpinned threads",
        "#   (started by the feeder, inheriting its CPU mask) would then pile up on one CPU.",
        f"irqaffinity={house} nohz_full={iso} rcu_nocbs={iso}", ""]
    return "\n".join(lines)


def emit(directory: Path, files: dict[str, str]) -> list[Path]:
    written = []
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onebox tune",
        description=("Read this box's CPU, NUMA and GPU topology and write systemd drop-ins that place "
                     "each onebox daemon (CPUAffinity=, AllowedCPUs=, CPUWeight=, the feeder thread's CPU "
                     "and SCHED_FIFO priority) and the kernel command line it recommends. "
                     "Without --emit it prints the plan. Install with: onebox tune --emit "
                     "/etc/systemd/system && systemctl daemon-reload && systemctl restart onebox.target"),
    )
    parser.add_argument("--emit", type=Path, metavar="DIR",
                        help="write the drop-ins and onebox-kernel-cmdline.txt under DIR")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="read /sys and /proc under this directory instead of / (for testing)")
    parser.add_argument("--example", metavar="CORESxNODES",
                        help="plan for a synthetic box instead of this one, e.g. 32x2")
    args = parser.parse_args(argv)
    if args.example:
        m = re.fullmatch(r"(\d+)x(\d+)", args.example)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1 or int(m.group(1)) % int(m.group(2)):
            parser.error("--example: CORESxNODES, cores a multiple of nodes, e.g. 32x2")
        topo = example_topology(int(m.group(1)), 2, int(m.group(2)))
    else:
        topo = read_topology(args.root)
    p = plan(topo)
    print(f"onebox tune: {topo.describe()}")
    for note in p.notes:
        print(f"  - {note}")
    if not p.isolate:
        bigger = example_topology(16, 2, 1)
        print(f"  On a larger box, e.g. {bigger.describe()}, it would do:")
        for note in plan(bigger).notes:
            print(f"    - {note}")
        print(f"    - kernel: {kernel_cmdline(bigger, plan(bigger)).splitlines()[-1]}")
    if args.emit:
        for path in emit(args.emit, render(topo, p)):
            print(f"wrote {path}")
        print("then: systemctl daemon-reload && systemctl restart onebox.target"
              + ("; the kernel command line takes a reboot" if p.isolate else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

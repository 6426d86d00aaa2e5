"""The GPU (when there is one): its NUMA node against the inference CPUs, and its PCIe link."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from daemons import cpu
from daemons.doctor.placement import Placement
from daemons.doctor.result import Result, read

AREA = "gpu"
NO_GPU = "no GPU (no /proc/driver/nvidia/gpus: no NVIDIA card, or its driver is not loaded)"
DROPIN = "etc/systemd/system/onebox-infer@.service.d/tune.conf"


def inference_cpus(root: Path, box: Placement, feeder_cpus: Mapping[str, str]) -> tuple[set[int], str]:
    """Where inference runs, and how that is known: the models' feeder_cpus (llama.cpp's
    threads inherit the feeder's mask), else `onebox tune`'s drop-in, else anywhere."""
    pinned = {m: cpu.parse_cpus(spec) for m, spec in feeder_cpus.items() if spec}
    if pinned:
        return set().union(*pinned.values()), "feeder_cpus of " + ", ".join(sorted(pinned))
    m = re.search(r"^CPUAffinity=(\S+)$", read(root, DROPIN) or "", re.M)
    if m:
        return cpu.parse_cpus(m.group(1)), f"CPUAffinity= in /{DROPIN}"
    return set(box.node_of), "not pinned: any CPU"


def check_numa(root: Path, box: Placement, feeder_cpus: Mapping[str, str]) -> Result:
    name = "GPU NUMA node"
    if not box.gpus:
        return Result(AREA, name, "skipped", NO_GPU)
    gpu = box.gpus[0]
    if len(box.nodes) == 1:
        return Result(AREA, name, "ok", f"{gpu.name} ({gpu.bus}); one NUMA node: every CPU is as near it as any")
    cpus, source = inference_cpus(root, box, feeder_cpus)
    node_of = box.node_of
    away = {c for c in cpus if node_of.get(c, gpu.node) != gpu.node}
    evidence = f"{gpu.name} ({gpu.bus}) is on node {gpu.node}; inference CPUs {box.text(cpus)} ({source})"
    if not away:
        return Result(AREA, name, "ok", f"{evidence}: all on the GPU's node")
    nodes = sorted({node_of[c] for c in away})
    return Result(AREA, name, "warn",
                  f"{evidence}: CPUs {box.text(away)} are on node(s) {', '.join(map(str, nodes))}, so the host "
                  "buffers and the threads feeding the GPU cross the interconnect",
                  f"onebox tune --emit /etc/systemd/system places inference on node {box.node} "
                  f"(CPUs {box.text(box.infer)}); set feeder_cpus in [models.NAME] within them")


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def check_pcie(root: Path, box: Placement) -> Result:
    name = "GPU PCIe link"
    if not box.gpus:
        return Result(AREA, name, "skipped", NO_GPU)
    said, fixes = [], []
    for gpu in box.gpus:
        dev = f"sys/bus/pci/devices/{gpu.bus}"
        width, top = _int(read(root, f"{dev}/current_link_width")), _int(read(root, f"{dev}/max_link_width"))
        speed, fastest = read(root, f"{dev}/current_link_speed"), read(root, f"{dev}/max_link_speed")
        if width is None or top is None:
            said.append(f"{gpu.name} ({gpu.bus}): no link width in /{dev}")
            continue
        slow = (f"; at {speed} of {fastest} (a GPU slows its link when idle: compare under load)"
                if speed and fastest and speed != fastest else f"; {speed}" if speed else "")
        said.append(f"{gpu.name} ({gpu.bus}): x{width} of x{top}{slow}")
        if width < top:
            fixes.append(f"seat {gpu.name} in a x{top} slot (a riser, or lanes shared with M.2 drives, narrows it)")
    if not fixes and all("no link width" in s for s in said):
        return Result(AREA, name, "skipped", "; ".join(said))
    if fixes:
        return Result(AREA, name, "warn", "; ".join(said) + ": the model upload and any layers left on the CPU "
                                                           "move over a narrower link", "; ".join(fixes))
    return Result(AREA, name, "ok", "; ".join(said) + ": full width")

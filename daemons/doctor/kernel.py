"""The kernel: its command line (CPU isolation, against `onebox tune`'s plan),
transparent huge pages and swap."""

from __future__ import annotations

import re
from pathlib import Path

from daemons import cpu
from daemons.doctor.placement import Placement
from daemons.doctor.result import Result, bracketed, read

AREA = "kernel"
GRUB = "GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub and reboot"
# "isolcpus=managed_irq,domain,2-7" and "rcu_nocbs=2-7:1/2": flags and group syntax around the list.
_CPU_TOKEN = re.compile(r"(\d+(?:-\d+)?)(?::\d+/\d+)?")


def cmdline_params(text: str) -> dict[str, str]:
    """The kernel's own parameters (those after `--` go to init), the last one winning as in
    the kernel; a bare flag maps to ""."""
    params: dict[str, str] = {}
    for word in text.split():
        if word == "--":
            break
        key, _, value = word.partition("=")
        params[key] = value
    return params


def cpu_list(value: str, all_cpus: list[int]) -> set[int]:
    if value.strip() == "all":
        return set(all_cpus)
    ids = [m.group(1) for token in value.split(",") if (m := _CPU_TOKEN.fullmatch(token.strip()))]
    return cpu.parse_cpus(",".join(ids))


def check_isolcpus(root: Path, box: Placement) -> Result:
    name = "isolcpus"
    text = read(root, "proc/cmdline")
    if text is None:
        return Result(AREA, name, "skipped", "no /proc/cmdline to read")
    value = cmdline_params(text).get("isolcpus")
    isolated = read(root, "sys/devices/system/cpu/isolated") or ""
    if value is None and not isolated:
        return Result(AREA, name, "ok", "not set, as onebox tune recommends: llama.cpp's threads inherit the "
                                        "feeder's CPU mask and need the scheduler to spread them")
    fix = f"remove isolcpus= from {GRUB}"
    if box.kernel_line:
        fix += f"; keep the inference CPUs quiet with `{box.kernel_line}` instead"
    return Result(AREA, name, "warn",
                  f"isolcpus={value or '?'} (isolated now: CPUs {isolated or 'none'}): isolated CPUs get no load "
                  "balancing, so llama.cpp's threads, started by the feeder and inheriting its CPU mask, can pile "
                  "onto one of them", fix)


def check_nohz(root: Path, box: Placement) -> Result:
    name = "nohz_full, rcu_nocbs"
    text = read(root, "proc/cmdline")
    if text is None:
        return Result(AREA, name, "skipped", "no /proc/cmdline to read")
    params = cmdline_params(text)
    found = ", ".join(f"{k}={params[k]}" for k in ("nohz_full", "rcu_nocbs", "irqaffinity") if k in params)
    found = f"kernel command line: {found or 'none of nohz_full=, rcu_nocbs=, irqaffinity='}"
    if not box.isolate:
        return Result(AREA, name, "ok", f"{found}; onebox tune sets no CPU aside here ({box.node_cores} core(s) on "
                                        f"node {box.node}, fewer than {box.min_cores}), so none are needed")
    want, house, every = set(box.isolate), set(box.housekeeping), sorted(box.node_of)
    problems = []
    nohz = cpu_list(params.get("nohz_full", ""), every)
    if nohz != want:
        problems.append(f"nohz_full should be {box.text(want)}")
    if not want <= cpu_list(params.get("rcu_nocbs", ""), every):
        problems.append(f"rcu_nocbs should cover {box.text(want)}")
    if cpu_list(params.get("irqaffinity", ""), every) != house:
        problems.append(f"irqaffinity should be {box.text(house)} (the housekeeping CPUs)")
    if "nohz_full" in params and read(root, "sys/devices/system/cpu/nohz_full") is None:
        problems.append("this kernel ignores nohz_full= (built without CONFIG_NO_HZ_FULL: no "
                        "/sys/devices/system/cpu/nohz_full)")
    if not problems:
        return Result(AREA, name, "ok", f"{found}: as onebox tune recommends (no tick and no RCU callbacks on the "
                                        "inference CPUs, interrupts on the housekeeping ones)")
    return Result(AREA, name, "warn", f"{found}; " + "; ".join(problems),
                  f"add `{box.kernel_line}` to {GRUB} (onebox tune --emit DIR writes it, each parameter "
                  "explained, to onebox-kernel-cmdline.txt)")


def check_thp(root: Path) -> Result:
    name = "transparent huge pages"
    enabled = read(root, "sys/kernel/mm/transparent_hugepage/enabled")
    if enabled is None:
        return Result(AREA, name, "skipped", "this kernel has no transparent huge pages (no "
                                             "/sys/kernel/mm/transparent_hugepage)")
    mode = bracketed(enabled)
    defrag = bracketed(read(root, "sys/kernel/mm/transparent_hugepage/defrag") or "?")
    evidence = f"enabled={mode}, defrag={defrag}"
    if mode == "always":
        stall = (" and, with defrag=always, a page fault in a decode step can stall in compaction"
                 if defrag == "always" else "")
        return Result(AREA, name, "warn",
                      f"{evidence}: every process's memory is collapsed into huge pages by khugepaged, under the "
                      f"memory map's lock (short stalls, memory bloat in small-object heaps){stall}",
                      "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled now, and add "
                      f"transparent_hugepage=madvise to {GRUB} to keep it")
    if mode == "madvise":
        return Result(AREA, name, "ok", f"{evidence}: huge pages only where a program asks for them, no "
                                        "background collapsing of everything else")
    return Result(AREA, name, "ok", f"{evidence}: no huge pages and no stalls (a little more TLB pressure "
                                    "over a large KV pool)")


def check_swap(root: Path) -> Result:
    name = "swap"
    swaps = read(root, "proc/swaps")
    if swaps is None:
        return Result(AREA, name, "skipped", "no /proc/swaps to read")
    devices = [line.split() for line in swaps.splitlines()[1:] if line.strip()]
    swappiness = read(root, "proc/sys/vm/swappiness") or "?"
    if not devices:
        return Result(AREA, name, "ok", "no swap: memory the plan does not have ends in the OOM killer rather "
                                        "than in paging (the memory check guards against that)")
    listed = ", ".join(f"{d[0]} ({d[1]}, {int(d[2]) // 1024} MiB, {int(d[3]) // 1024} MiB used)"
                       if len(d) >= 4 and d[2].isdigit() and d[3].isdigit() else d[0] for d in devices)
    evidence = f"{listed}; vm.swappiness={swappiness}"
    if all("zram" in d[0] for d in devices):
        return Result(AREA, name, "ok", f"{evidence}: compressed RAM (zram), no disk in the request path")
    if swappiness.isdigit() and int(swappiness) <= 10:
        return Result(AREA, name, "ok", f"{evidence}: swap on disk kept as a last resort")
    return Result(AREA, name, "warn",
                  f"{evidence}: under memory pressure the kernel pages out anonymous memory, the KV cache among "
                  "it, and a decode step that touches a swapped-out cell waits for the disk",
                  "sysctl vm.swappiness=1 now, and `vm.swappiness = 1` in /etc/sysctl.d/90-onebox.conf to keep it "
                  "(swap stays as a last resort)")

"""systemd as PID 1 and cgroup v2: what makes the units' CPUWeight= and AllowedCPUs= real."""

from __future__ import annotations

from pathlib import Path

from daemons.doctor import mounts
from daemons.doctor.result import Result, read, under

AREA = "systemd and cgroups"
PLACEMENT = ("cpu", "cpuset")  # CPUWeight= needs cpu, AllowedCPUs= cpuset


def pid1_is_systemd(root: Path) -> bool:
    # sd_booted()'s own test, then the name, for a tree without /run.
    return under(root, "run/systemd/system").is_dir() or read(root, "proc/1/comm") == "systemd"


def check_init(root: Path) -> Result:
    name = "init (PID 1)"
    comm = read(root, "proc/1/comm")
    if pid1_is_systemd(root):
        return Result(AREA, name, "ok", "PID 1 is systemd: the units (onebox.target) run the suite with their "
                                        "CPU weights, capabilities and sandboxing")
    return Result(AREA, name, "warn",
                  f"PID 1 is {comm or 'unknown'}, not systemd (no /run/systemd/system): the units cannot run "
                  "here, so none of their settings apply (CPUWeight=, AllowedCPUs=, AmbientCapabilities="
                  "CAP_SYS_NICE, the sandboxing); `onebox up` runs the suite without them",
                  "in production run onebox on a systemd host (scripts/install); a container needs systemd as "
                  "its init (systemd-nspawn -b, as tests/system do)")


def check_cgroup(root: Path) -> Result:
    name = "cgroup v2 (CPUWeight=, AllowedCPUs=)"
    found = mounts.mounts(root)
    v1 = [m for m in found if m.fstype == "cgroup"]
    v2 = [m for m in found if m.fstype == "cgroup2"]
    systemd = pid1_is_systemd(root)
    if any(m.point == "/sys/fs/cgroup" for m in v2):
        controllers = (read(root, "sys/fs/cgroup/cgroup.controllers") or "").split()
        missing = [c for c in PLACEMENT if c not in controllers]
        evidence = f"cgroup v2 at /sys/fs/cgroup, controllers: {' '.join(controllers) or 'none'}"
        if missing:
            return Result(AREA, name, "warn",
                          f"{evidence}: no {' or '.join(missing)} controller, so systemd cannot enforce "
                          "CPUWeight= (cpu) or AllowedCPUs= (cpuset) here; CPUAffinity= still pins the processes",
                          "a kernel with CONFIG_CGROUP_SCHED and CONFIG_CPUSETS; in a container, have the host "
                          "delegate the cpu and cpuset controllers to it")
        slice_ctl = read(root, "sys/fs/cgroup/onebox.slice/cgroup.subtree_control")
        if slice_ctl is not None:
            evidence += f"; onebox.slice gives its units: {slice_ctl or 'nothing'}"
        how = ("enforced: systemd writes them to cpu.weight and cpuset.cpus" if systemd
               else "enforced once systemd runs the units (PID 1 here is not systemd)")
        return Result(AREA, name, "ok", f"{evidence}: CPUWeight= and AllowedCPUs= are {how}")
    if v1:
        controllers = sorted({o for m in v1 for o in m.super_options if o in {"cpu", "cpuset", "cpuacct", "memory",
                                                                                "blkio", "pids"}})
        mode = "hybrid" if v2 else "legacy"
        absent = "" if systemd else "; and PID 1 here is not systemd, so nothing applies them at all"
        return Result(AREA, name, "warn",
                      f"cgroup v1 ({mode}): controllers {' '.join(controllers) or 'none'} on v1 hierarchies"
                      f"{', an empty cgroup2 at ' + v2[0].point if v2 else ''}. systemd accepts CPUWeight= and "
                      "AllowedCPUs= but does not enforce them here: they are cgroup v2 settings, AllowedCPUs= "
                      f"needing the v2 cpuset controller{absent}. CPUAffinity= still pins the processes and the "
                      "background daemons' nice 10 still applies, but inference does not outweigh them",
                      "boot with systemd.unified_cgroup_hierarchy=1 on GRUB_CMDLINE_LINUX in /etc/default/grub, "
                      "update-grub, reboot (v2 is systemd's default since 247; 256 drops v1); in a container, the "
                      "host's cgroup mode decides")
    return Result(AREA, name, "skipped", "no cgroup filesystem in /proc/self/mountinfo")

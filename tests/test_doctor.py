"""`onebox doctor`: each check against fake /proc and /sys trees written in a temp dir
(the files the kernel would show, with known contents), then the real run on this host."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemons.config import Config, PathsConfig
from daemons.ctl import doctor_cmd, tune
from daemons.doctor import cgroups, gpu, kernel, memory, realtime, report, storage
from daemons.doctor.mounts import containing, parse
from daemons.doctor.placement import Placement
from daemons.doctor.result import STATUSES, Result
from daemons.infer.memory import MIB, MemoryPlan
from tests.test_tune import fake_box

ROOT = Path(__file__).resolve().parents[1]
DOCTOR = [sys.executable, "-m", "daemons.ctl.doctor_cmd"]
NICE = 1 << 23  # CAP_SYS_NICE in CapEff


def write(root: Path, path: str, text: str) -> Path:
    f = root / path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    return f


def box(root: Path, cores: int = 2, gpus: list[tuple[str, str, int]] | None = None, nodes: int = 1) -> Placement:
    """A fake box's topology as onebox tune reads it and what it recommends there."""
    fake_box(root, cores=cores, nodes=nodes, gpus=gpus)
    return doctor_cmd.read_placement(root)


# -- kernel ----------------------------------------------------------------------------

def test_isolcpus_absent_is_ok_and_present_warns(tmp_path: Path) -> None:
    b = box(tmp_path, cores=8)
    write(tmp_path, "proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/nvme0n1p2 ro quiet\n")
    assert kernel.check_isolcpus(tmp_path, b).status == "ok"
    write(tmp_path, "proc/cmdline", "ro quiet isolcpus=managed_irq,domain,1-7 -- isolcpus=ignored\n")
    write(tmp_path, "sys/devices/system/cpu/isolated", "1-7\n")
    r = kernel.check_isolcpus(tmp_path, b)
    assert r.status == "warn" and "isolcpus=managed_irq,domain,1-7" in r.evidence and "load balancing" in r.evidence
    assert "remove isolcpus=" in r.fix and "nohz_full=1-7" in r.fix  # and what to use instead


def test_nohz_against_tunes_plan(tmp_path: Path) -> None:
    b = box(tmp_path, cores=8)
    line = b.kernel_line
    assert line == "irqaffinity=0 nohz_full=1-7 rcu_nocbs=1-7"
    write(tmp_path, "proc/cmdline", "ro quiet\n")
    r = kernel.check_nohz(tmp_path, b)
    assert r.status == "warn" and "nohz_full should be 1-7" in r.evidence and line in r.fix
    write(tmp_path, "proc/cmdline", f"ro {line}\n")
    write(tmp_path, "sys/devices/system/cpu/nohz_full", "1-7\n")
    assert kernel.check_nohz(tmp_path, b).status == "ok"
    # rcu_nocbs may cover more (all); nohz_full= on a kernel without NO_HZ_FULL is ignored.
    write(tmp_path, "proc/cmdline", "irqaffinity=0 nohz_full=1-7 rcu_nocbs=all\n")
    assert kernel.check_nohz(tmp_path, b).status == "ok"
    (tmp_path / "sys/devices/system/cpu/nohz_full").unlink()
    r = kernel.check_nohz(tmp_path, b)
    assert r.status == "warn" and "CONFIG_NO_HZ_FULL" in r.evidence


def test_nohz_on_a_small_box_needs_nothing(tmp_path: Path) -> None:
    b = box(tmp_path, cores=2)
    assert b.kernel_line == ""
    write(tmp_path, "proc/cmdline", "console=ttyS0 quiet\n")
    r = kernel.check_nohz(tmp_path, b)
    assert r.status == "ok" and "2 core(s)" in r.evidence
    assert kernel.check_nohz(tmp_path / "nothing", b).status == "skipped"


def test_cmdline_parsing() -> None:
    params = kernel.cmdline_params("ro nohz_full=2-3 quiet nohz_full=4 -- init=x")
    assert params == {"ro": "", "nohz_full": "4", "quiet": ""}
    assert kernel.cpu_list("managed_irq,domain,2-3,6", [0, 1]) == {2, 3, 6}
    assert kernel.cpu_list("1-3:1/2", []) == {1, 2, 3} and kernel.cpu_list("all", [0, 1]) == {0, 1}


@pytest.mark.parametrize(("enabled", "defrag", "status"), [
    ("[always] madvise never", "always defer defer+madvise [madvise] never", "warn"),
    ("always [madvise] never", "always defer defer+madvise [madvise] never", "ok"),
    ("always madvise [never]", "[always] defer defer+madvise madvise never", "ok"),
])
def test_transparent_huge_pages(tmp_path: Path, enabled: str, defrag: str, status: str) -> None:
    write(tmp_path, "sys/kernel/mm/transparent_hugepage/enabled", enabled + "\n")
    write(tmp_path, "sys/kernel/mm/transparent_hugepage/defrag", defrag + "\n")
    r = kernel.check_thp(tmp_path)
    assert r.status == status
    if status == "warn":
        assert "enabled=always" in r.evidence and "transparent_hugepage=madvise" in r.fix
        assert "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled" in r.fix


def test_thp_always_with_defrag_always_names_the_stall(tmp_path: Path) -> None:
    write(tmp_path, "sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never\n")
    write(tmp_path, "sys/kernel/mm/transparent_hugepage/defrag", "[always] defer madvise never\n")
    assert "compaction" in kernel.check_thp(tmp_path).evidence
    assert kernel.check_thp(tmp_path / "none").status == "skipped"


SWAP_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


@pytest.mark.parametrize(("lines", "swappiness", "status"), [
    ("", "60", "ok"),
    ("/dev/nvme0n1p3                          partition\t8388604\t\t1024\t\t-2\n", "60", "warn"),
    ("/dev/nvme0n1p3                          partition\t8388604\t\t0\t\t-2\n", "1", "ok"),
    ("/dev/zram0                              partition\t4194300\t\t0\t\t100\n", "100", "ok"),
])
def test_swap(tmp_path: Path, lines: str, swappiness: str, status: str) -> None:
    write(tmp_path, "proc/swaps", SWAP_HEADER + lines)
    write(tmp_path, "proc/sys/vm/swappiness", swappiness + "\n")
    r = kernel.check_swap(tmp_path)
    assert r.status == status
    if lines:
        assert lines.split()[0] in r.evidence and f"vm.swappiness={swappiness}" in r.evidence
    if status == "warn":
        assert "8191 MiB, 1 MiB used" in r.evidence and "vm.swappiness = 1" in r.fix


# -- systemd and cgroups ---------------------------------------------------------------

UNIFIED = "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID = ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
          "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
          "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
          "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")


def test_init_is_systemd_or_not(tmp_path: Path) -> None:
    write(tmp_path, "proc/1/comm", "process_api\n")
    r = cgroups.check_init(tmp_path)
    assert r.status == "warn" and "PID 1 is process_api" in r.evidence and "onebox up" in r.evidence
    write(tmp_path, "proc/1/comm", "systemd\n")
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    assert cgroups.check_init(tmp_path).status == "ok"


def test_cgroup_v2_with_cpu_and_cpuset_is_enforced(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/mountinfo", UNIFIED)
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
    write(tmp_path, "sys/fs/cgroup/onebox.slice/cgroup.subtree_control", "cpuset cpu memory pids\n")
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    r = cgroups.check_cgroup(tmp_path)
    assert r.status == "ok" and "enforced" in r.evidence and "onebox.slice gives its units: cpuset cpu" in r.evidence


def test_cgroup_v2_without_cpuset_warns(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/mountinfo", UNIFIED)
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpu io memory pids\n")
    r = cgroups.check_cgroup(tmp_path)
    assert r.status == "warn" and "no cpuset controller" in r.evidence


def test_cgroup_v1_hybrid_is_not_enforced(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/mountinfo", HYBRID)
    write(tmp_path, "proc/1/comm", "process_api\n")
    r = cgroups.check_cgroup(tmp_path)
    assert r.status == "warn"
    assert "cgroup v1 (hybrid): controllers cpu cpuset" in r.evidence and "does not enforce" in r.evidence
    assert "nothing applies them" in r.evidence and "systemd.unified_cgroup_hierarchy=1" in r.fix
    assert cgroups.check_cgroup(tmp_path / "none").status == "skipped"


# -- the feeder's real-time permission ---------------------------------------------------

def status_file(root: Path, cap_eff: int) -> None:
    write(root, "proc/self/status", f"Name:\tpython\nCapPrm:\t{cap_eff:016x}\nCapEff:\t{cap_eff:016x}\n")


def test_realtime_not_asked_for_on_a_small_box(tmp_path: Path) -> None:
    b = box(tmp_path, cores=2)
    status_file(tmp_path, 0)
    r = realtime.check_realtime(tmp_path, {"smollm2": 0}, b.feeder_priority, rlimit=(0, 0))
    assert r.status == "ok" and "RLIMIT_RTPRIO 0 (hard 0, which only CAP_SYS_NICE gets past), CAP_SYS_NICE no" in r.evidence


def test_realtime_recommended_by_tune_but_not_configured(tmp_path: Path) -> None:
    b = box(tmp_path, cores=8)
    status_file(tmp_path, 0)
    r = realtime.check_realtime(tmp_path, {"smollm2": 0}, b.feeder_priority, rlimit=(0, 0))
    assert r.status == "warn" and "SCHED_FIFO 10" in r.evidence and "onebox tune --emit" in r.fix
    # The drop-in's override counts as configured.
    write(tmp_path, "etc/systemd/system/onebox-infer@.service.d/tune.conf",
          "[Service]\nEnvironment=ONEBOX__MODELS__%i__FEEDER_PRIORITY=10\n")
    status_file(tmp_path, NICE)
    r = realtime.check_realtime(tmp_path, {"smollm2": 0}, b.feeder_priority, rlimit=(0, 0))
    assert r.status == "ok" and "smollm2 10" in r.evidence


def test_realtime_without_permission_explains_the_unit(tmp_path: Path) -> None:
    b = box(tmp_path, cores=2)
    status_file(tmp_path, 0)
    r = realtime.check_realtime(tmp_path, {"smollm2": 5}, b.feeder_priority, rlimit=(0, 0))
    assert r.status == "warn"
    assert "only CAP_SYS_NICE gets past" in r.evidence and "AmbientCapabilities=CAP_SYS_NICE" in r.evidence
    assert "rtprio 5" in r.fix
    # An rtprio limit as high as the priority, or the capability, is enough for this process.
    assert realtime.check_realtime(tmp_path, {"smollm2": 5}, b.feeder_priority, rlimit=(5, 5)).status == "ok"
    status_file(tmp_path, NICE)
    assert realtime.check_realtime(tmp_path, {"smollm2": 5}, b.feeder_priority, rlimit=(0, 0)).status == "ok"


def test_realtime_under_systemd_with_the_unit(tmp_path: Path) -> None:
    b = box(tmp_path, cores=2)
    status_file(tmp_path, 0)
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    write(tmp_path, "etc/systemd/system/onebox-infer@.service",
          "[Service]\nCapabilityBoundingSet=CAP_SYS_NICE\nAmbientCapabilities=CAP_SYS_NICE\n")
    r = realtime.check_realtime(tmp_path, {"smollm2": 5}, b.feeder_priority, rlimit=(0, 0))
    assert r.status == "ok" and "the installed unit grants CAP_SYS_NICE" in r.evidence
    # RT group scheduling on a v1 cpu hierarchy gives a unit's own cgroup no RT time.
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.rt_runtime_us", "950000\n")
    r = realtime.check_realtime(tmp_path, {"smollm2": 5}, b.feeder_priority, rlimit=(0, 0))
    assert r.status == "warn" and "EPERM even with CAP_SYS_NICE" in r.evidence and "cpu.rt_runtime_us" in r.fix


# -- the state directory -----------------------------------------------------------------

def disk(root: Path, name: str, scheduler: str, rotational: str = "0", part: str = "",
         majmin: str = "259:2", crypt: bool = False) -> None:
    """/sys/block/NAME (and a partition under it, and dm-crypt over that), reachable from
    /sys/dev/block/M:m as in sysfs; the state dir's filesystem is mounted from it."""
    d = root / "sys/devices/pci0000:00/block" / name
    write(root, f"{d.relative_to(root)}/queue/scheduler", scheduler + "\n")
    write(root, f"{d.relative_to(root)}/queue/rotational", rotational + "\n")
    target = d
    if part:
        target = d / part
        write(root, f"{target.relative_to(root)}/partition", "2\n")
    if crypt:
        dm = root / "sys/devices/virtual/block/dm-0"
        write(root, "sys/devices/virtual/block/dm-0/dm/uuid", "CRYPT-LUKS2-0123abcd-luks-0123abcd\n")
        write(root, "sys/devices/virtual/block/dm-0/dm/name", "luks-0123abcd\n")
        write(root, "sys/devices/virtual/block/dm-0/queue/scheduler", "none\n")
        (dm / "slaves").mkdir()
        (dm / "slaves" / target.name).symlink_to(target)
        target = dm
    (root / "sys/dev/block").mkdir(parents=True, exist_ok=True)
    (root / "sys/dev/block" / majmin).symlink_to(target)


def mounted(root: Path, line: str) -> None:
    write(root, "proc/self/mountinfo", "22 27 0:21 / /proc rw,relatime - proc proc rw\n" + line + "\n")


STATE = Path("/var/lib/onebox")


def test_nvme_wants_no_scheduler(tmp_path: Path) -> None:
    disk(tmp_path, "nvme0n1", "[mq-deadline] none", part="nvme0n1p2")
    mounted(tmp_path, "27 1 259:2 / / rw,noatime - ext4 /dev/nvme0n1p2 rw,errors=remount-ro")
    r = storage.check_scheduler(tmp_path, STATE)
    assert r.status == "warn" and "nvme0n1 (NVMe): scheduler [mq-deadline] none" in r.evidence
    assert "echo none > /sys/block/nvme0n1/queue/scheduler" in r.fix and 'KERNEL=="nvme[0-9]*n[0-9]*"' in r.fix
    (tmp_path / "sys/devices/pci0000:00/block/nvme0n1/queue/scheduler").write_text("[none] mq-deadline\n")
    assert storage.check_scheduler(tmp_path, STATE).status == "ok"


def test_spinning_disk_wants_a_scheduler(tmp_path: Path) -> None:
    disk(tmp_path, "sda", "[none] mq-deadline bfq", rotational="1", part="sda1", majmin="8:1")
    mounted(tmp_path, "27 1 8:1 / / rw,noatime - xfs /dev/sda1 rw")
    r = storage.check_scheduler(tmp_path, STATE)
    assert r.status == "warn" and "rotational disk" in r.evidence and "echo mq-deadline" in r.fix


def test_dm_crypt_is_found_under_the_filesystem(tmp_path: Path) -> None:
    disk(tmp_path, "nvme0n1", "[none] mq-deadline", part="nvme0n1p3", majmin="253:0", crypt=True)
    mounted(tmp_path, "27 1 253:0 / / rw,noatime - ext4 /dev/mapper/luks-0123abcd rw")
    r = storage.check_encryption(tmp_path, STATE)
    assert r.status == "ok" and "luks-0123abcd -> nvme0n1p3" in r.evidence and "(LUKS2)" in r.evidence
    # The scheduler is the physical disk's, below the dm device and the partition.
    r = storage.check_scheduler(tmp_path, STATE)
    assert r.status == "ok" and "nvme0n1 (NVMe): scheduler [none] mq-deadline" in r.evidence


def test_plain_disk_is_not_encrypted(tmp_path: Path) -> None:
    disk(tmp_path, "vda", "none [mq-deadline]", rotational="1", majmin="254:0")
    mounted(tmp_path, "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard")
    r = storage.check_encryption(tmp_path, STATE)
    assert r.status == "warn" and "no dm-crypt" in r.evidence and "LUKS" in r.fix
    assert storage.check_scheduler(tmp_path, STATE).status == "ok"  # a virtio disk, whatever it claims


def test_atime_options(tmp_path: Path) -> None:
    disk(tmp_path, "vda", "[none]", majmin="254:0")
    mounted(tmp_path, "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw")
    r = storage.check_mount_options(tmp_path, STATE)
    assert r.status == "warn" and "relatime" in r.evidence
    assert r.fix == "add noatime to /'s options in /etc/fstab, then mount -o remount,noatime /"
    # A separate /var/lib mount, later and longer, is the one the state dir is on.
    (tmp_path / "var/lib").mkdir(parents=True)
    write(tmp_path, "proc/self/mountinfo", "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
                                           "40 27 254:0 / /var/lib rw,noatime - ext4 /dev/vda rw\n")
    r = storage.check_mount_options(tmp_path, STATE)
    assert r.status == "ok" and r.evidence.startswith("/var/lib (ext4) mounted rw,noatime")


def test_filesystems(tmp_path: Path) -> None:
    (tmp_path / "var/lib").mkdir(parents=True)
    mounted(tmp_path, "27 1 0:30 / /var/lib rw - tmpfs tmpfs rw,size=1G")
    r = storage.check_filesystem(tmp_path, STATE)
    assert r.status == "warn" and "(not made yet: /var/lib)" in r.evidence and "gone at the next reboot" in r.evidence
    assert storage.check_scheduler(tmp_path, STATE).status == "skipped"
    assert storage.check_encryption(tmp_path, STATE).status == "ok"
    mounted(tmp_path, "27 1 0:31 / /var/lib rw,relatime - nfs4 srv:/export rw,vers=4.2")
    assert storage.check_filesystem(tmp_path, STATE).status == "fail"
    assert storage.check_encryption(tmp_path, STATE).status == "skipped"
    mounted(tmp_path, "27 1 254:0 / /var/lib ro,relatime - ext4 /dev/vda ro")
    r = storage.check_filesystem(tmp_path, STATE)
    assert r.status == "fail" and "read-only" in r.evidence
    mounted(tmp_path, "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw")
    assert storage.check_filesystem(tmp_path, STATE).status == "ok"
    assert storage.check_filesystem(tmp_path / "empty", STATE).status == "skipped"


def test_mountinfo_parsing() -> None:
    mounts = parse("36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
                   "37 35 98:0 / /mnt rw shared:2 - ext4 /dev/root rw\n")
    assert mounts[0].point == "/mnt/my disk" and mounts[0].options == ("rw", "noatime")
    assert mounts[0].fstype == "ext3" and mounts[0].super_options == ("rw", "errors=continue")
    found = containing(mounts, "/mnt/my disk/x")
    assert found is not None and found.point == "/mnt/my disk"
    other = containing(mounts, "/mnt/mydisk")
    assert other is not None and other.point == "/mnt"
    assert containing(mounts, "/etc") is None


# -- the GPU -----------------------------------------------------------------------------

def test_gpu_checks_skip_without_a_gpu(tmp_path: Path) -> None:
    b = box(tmp_path, cores=4)
    for r in (gpu.check_numa(tmp_path, b, {}), gpu.check_pcie(tmp_path, b)):
        assert r.status == "skipped" and "no GPU" in r.evidence


def test_gpu_numa_node_against_the_inference_cpus(tmp_path: Path) -> None:
    b = box(tmp_path, cores=16, nodes=2, gpus=[("NVIDIA L4", "0000:81:00.0", 1)])
    assert b.node == 1 and b.gpus[0].node == 1
    r = gpu.check_numa(tmp_path, b, {"big": "0-3"})
    assert r.status == "warn" and "is on node 1" in r.evidence and "CPUs 0-3 are on node(s) 0" in r.evidence
    assert f"CPUs {tune.fmt(set(b.infer))}" in r.fix
    assert gpu.check_numa(tmp_path, b, {"big": "9-15"}).status == "ok"
    # Without feeder_cpus, onebox tune's drop-in says where inference runs; without it, anywhere.
    assert gpu.check_numa(tmp_path, b, {"big": ""}).status == "warn"
    write(tmp_path, gpu.DROPIN, f"[Service]\nCPUAffinity={tune.fmt(set(b.infer))}\n")
    r = gpu.check_numa(tmp_path, b, {"big": ""})
    assert r.status == "ok" and "CPUAffinity=" in r.evidence


def test_gpu_pcie_link_width(tmp_path: Path) -> None:
    b = box(tmp_path, cores=4, gpus=[("NVIDIA L4", "0000:01:00.0", 0)])
    assert gpu.check_pcie(tmp_path, b).status == "skipped"  # no link attributes
    dev = "sys/bus/pci/devices/0000:01:00.0"
    write(tmp_path, f"{dev}/max_link_width", "16\n")
    write(tmp_path, f"{dev}/current_link_width", "8\n")
    write(tmp_path, f"{dev}/max_link_speed", "16.0 GT/s PCIe\n")
    write(tmp_path, f"{dev}/current_link_speed", "2.5 GT/s PCIe\n")
    r = gpu.check_pcie(tmp_path, b)
    assert r.status == "warn" and "x8 of x16" in r.evidence and "idle" in r.evidence and "x16 slot" in r.fix
    write(tmp_path, f"{dev}/current_link_width", "16\n")
    assert gpu.check_pcie(tmp_path, b).status == "ok"
    assert gpu.check_numa(tmp_path, b, {}).status == "ok"  # one node


# -- memory against the plan -------------------------------------------------------------------

def planned(total_mib: int, budget_mib: int = 100_000) -> MemoryPlan:
    # headroom (96 MiB) is part of every plan; the rest is the model's.
    return MemoryPlan(model=(total_mib - 96) * MIB, kv_cells=0, bytes_per_cell=0, compute=0, runtime=0,
                      budget=budget_mib * MIB)


@pytest.mark.parametrize(("available_mib", "status"), [(8000, "ok"), (1100, "warn"), (900, "fail")])
def test_free_memory_against_the_plan(tmp_path: Path, available_mib: int, status: str) -> None:
    write(tmp_path, "proc/meminfo", f"MemTotal:       16000000 kB\nMemAvailable:   {available_mib * 1024} kB\n")
    estimates = [memory.Estimate("a", planned(600)), memory.Estimate("b", planned(400)),
                 memory.Estimate("gone", None, "model file /x.gguf does not exist")]
    r = memory.check_available(tmp_path, estimates, "/etc/onebox/onebox.toml")
    assert r.status == status and "in all 1,000 MiB" in r.evidence and "gone: no estimate" in r.evidence
    if status != "ok":
        assert "kv_tokens" in r.fix


def test_running_daemons_hold_their_plan_already(tmp_path: Path) -> None:
    write(tmp_path, "proc/meminfo", f"MemAvailable:   {900 * 1024} kB\n")
    page = os.sysconf("SC_PAGE_SIZE")
    for pid, argv in ((41, ["/opt/onebox/venv/bin/python", "/opt/onebox/venv/bin/onebox", "infer", "a", "--config",
                            "/etc/onebox/onebox.toml"]),
                      (42, [sys.executable, "-m", "daemons.infer.main", "a", "--config", "/elsewhere/onebox.toml"]),
                      (43, [sys.executable, "-m", "daemons.router.main", "--config", "/etc/onebox/onebox.toml"])):
        (tmp_path / f"proc/{pid}").mkdir(parents=True)
        (tmp_path / f"proc/{pid}/cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        write(tmp_path, f"proc/{pid}/statm", f"100000 {300 * MIB // page} 0 0 0 0 0\n")
    assert memory.running_inference(tmp_path, ["a"], "/etc/onebox/onebox.toml") == {"a": 300 * MIB}
    r = memory.check_available(tmp_path, [memory.Estimate("a", planned(1000))], "/etc/onebox/onebox.toml")
    assert r.status == "ok" and "+ 300 MiB held by running a" in r.evidence


def test_memory_budget(tmp_path: Path) -> None:
    assert memory.check_budgets([memory.Estimate("a", planned(500, budget_mib=1000))]).status == "ok"
    r = memory.check_budgets([memory.Estimate("a", planned(1500, budget_mib=1000))])
    assert r.status == "fail" and "would exit 78" in r.evidence
    assert memory.check_budgets([]).status == "skipped"


def test_estimate_reads_the_configured_gguf() -> None:
    from daemons.ctl import api

    config = api.load_config(str(ROOT / "etc/onebox/onebox.toml"), ("paths", "models"))
    [e] = doctor_cmd.estimate(config)
    assert e.plan is not None, e.why
    mc = config.models[e.model]
    # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) x 2 B (daemons/config/models.py says 22.5 KiB).
    assert e.plan.kv_cells == mc.kv_tokens and e.plan.bytes_per_cell == 23040 and e.plan.model > 50 * MIB
    missing = Config(paths=PathsConfig(models_dir="/nonexistent"),
                     models={"x": dataclasses.replace(mc, path="/nonexistent/x.gguf")})
    [e] = doctor_cmd.estimate(missing)
    assert e.plan is None and "does not exist" in e.why


# -- the whole command -------------------------------------------------------------------

def test_a_failing_check_exits_1_and_missing_files_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("ONEBOX_STATE_DIR", "ONEBOX_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "root"
    box(root, cores=2)
    (root / "srv").mkdir()
    mounted(root, "27 1 0:31 / /srv rw,relatime - nfs4 srv:/export rw,vers=4.2")
    config = write(tmp_path, "onebox.toml", '[paths]\nstate_dir = "/srv/onebox"\n')
    assert doctor_cmd.main(["--root", str(root), "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "  fail    filesystem" in out and "set paths.state_dir to a local disk" in out
    assert "  skipped transparent huge pages" in out and "summary: " in out and "1 fail" in out
    assert doctor_cmd.main(["--root", str(root), "--config", str(tmp_path / "missing.toml"), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["checks"][0]["status"] == "fail" and data["config"] is None
    assert {"name": "filesystem", "why": "the config could not be read"} in data["skipped"]


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    """The real thing on this host, as an unprivileged user when the tests run as root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEBOX")}
    # setpriv, not subprocess's user=: here only it can still exec the venv's python,
    # which links into root's home.
    setpriv = shutil.which("setpriv")
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if setpriv and os.geteuid() == 0 else []
    return subprocess.run([*drop, *DOCTOR, *args], cwd="/", env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)


def test_real_run_on_this_host_unprivileged() -> None:
    proc = run_doctor("--json")
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)
    checks = data["checks"]
    assert [c["name"] for c in checks] == [r.name for r in report.run(Path("/"), doctor_cmd.read_placement(Path("/")), None, [])]  # every check, always
    assert all(c["status"] in STATUSES and c["evidence"] for c in checks)
    assert all(c["fix"] for c in checks if c["status"] in ("warn", "fail"))
    assert data["skipped"] == [{"name": c["name"], "why": c["evidence"]} for c in checks if c["status"] == "skipped"]
    assert proc.returncode == (1 if any(c["status"] == "fail" for c in checks) else 0)
    if os.geteuid() == 0 and shutil.which("setpriv"):  # it really ran unprivileged: no CAP_SYS_NICE
        assert "CAP_SYS_NICE no" in next(c["evidence"] for c in checks if c["name"] == "feeder real-time priority")

    text = run_doctor()
    assert text.returncode == proc.returncode, text.stderr
    for c in checks:
        assert f"  {c['status']:<7} {c['name']}" in text.stdout
    skipped = text.stdout.partition("\nskipped:\n")[2]
    for c in data["skipped"]:
        assert f"  - {c['name']}: " in skipped
    assert text.stdout.rstrip().splitlines()[-1].startswith("summary: ")


def test_help() -> None:
    proc = subprocess.run([*DOCTOR, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "onebox doctor" in proc.stdout and "--json" in proc.stdout


def test_report_rows_for_onebox_report(tmp_path: Path) -> None:
    box(tmp_path, cores=2)
    rows = doctor_cmd.report_rows(Config(), root=tmp_path)
    assert rows and {"area", "name", "status", "evidence", "fix"} == set(rows[0])


def test_what_a_check_cannot_read_makes_it_skipped() -> None:
    def unreadable() -> Result:
        raise PermissionError(13, "Permission denied", "/proc/1/comm")

    r = report._safe("systemd and cgroups", "init (PID 1)", unreadable)
    assert r.status == "skipped" and "permission denied reading /proc/1/comm: run as root" in r.evidence

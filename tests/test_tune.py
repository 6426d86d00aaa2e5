"""`onebox tune` on fake topologies: real sysfs/procfs-shaped files in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemons import registry
from daemons.ctl import tune


def fake_box(root: Path, cores: int, threads: int = 1, nodes: int = 1,
             gpus: list[tuple[str, str, int]] | None = None) -> Path:
    """Write /sys and /proc files for `cores` x `threads` CPUs over `nodes` nodes.

    CPU numbering as Linux does it on x86: first threads of every core, then siblings.
    """
    cpu_dir = root / "sys/devices/system/cpu"
    n = cores * threads
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "online").write_text(f"0-{n - 1}\n" if n > 1 else "0\n")
    per_node = cores // nodes
    node_cpus: dict[int, list[int]] = {}
    for t in range(threads):
        for core in range(cores):
            cid = t * cores + core
            topo = cpu_dir / f"cpu{cid}" / "topology"
            topo.mkdir(parents=True)
            (topo / "core_id").write_text(f"{core % per_node}\n")
            (topo / "physical_package_id").write_text(f"{core // per_node}\n")
            node_cpus.setdefault(core // per_node, []).append(cid)
    if nodes > 1:
        for node, ids in node_cpus.items():
            d = root / f"sys/devices/system/node/node{node}"
            d.mkdir(parents=True)
            (d / "cpulist").write_text(tune.fmt(ids) + "\n")
    for i, (model, bus, node) in enumerate(gpus or []):
        g = root / f"proc/driver/nvidia/gpus/{bus}"
        g.mkdir(parents=True)
        (g / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 100\nBus Location: \t {bus}\n")
        pci = root / f"sys/bus/pci/devices/{bus}"
        pci.mkdir(parents=True)
        (pci / "numa_node").write_text(f"{node}\n")
    return root


def test_fmt_ranges() -> None:
    assert tune.fmt([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert tune.fmt({3}) == "3"
    assert tune.fmt([]) == ""


def test_reads_cores_siblings_and_nodes(tmp_path: Path) -> None:
    topo = tune.read_topology(fake_box(tmp_path, cores=8, threads=2, nodes=2), nvidia_smi=False)
    assert len(topo.cpus) == 16 and topo.nodes == [0, 1]
    assert topo.cores(0) == [[0, 8], [1, 9], [2, 10], [3, 11]]
    assert topo.cores(1)[0] == [4, 12]
    assert "16 CPUs, 8 cores (2 thread(s) per core), 2 NUMA node(s); no GPU" == topo.describe()


def test_two_cores_share_everything_and_isolate_nothing(tmp_path: Path) -> None:
    topo = tune.read_topology(fake_box(tmp_path, cores=2), nvidia_smi=False)
    p = tune.plan(topo)
    assert p.infer == p.housekeeping == [0, 1]
    assert p.isolate == [] and p.feeder == [0, 1] and p.feeder_priority == 0 and p.threads == 2
    files = tune.render(topo, p)
    infer = files["onebox-infer@.service.d/tune.conf"]
    assert "CPUAffinity=0-1" in infer and "CPUWeight=1000" in infer
    assert 'Environment="ONEBOX__MODELS__%i__FEEDER_CPUS=\\"0-1\\""' in infer
    assert "FEEDER_PRIORITY=" not in infer  # the admin's config decides on a small box
    assert not [ln for ln in files["onebox-kernel-cmdline.txt"].splitlines() if ln and not ln.startswith("#")]


def test_sixteen_cores_smt_one_node(tmp_path: Path) -> None:
    topo = tune.read_topology(fake_box(tmp_path, cores=16, threads=2), nvidia_smi=False)
    p = tune.plan(topo)
    # Two cores (with their siblings) for the OS and router; the rest for inference.
    assert p.housekeeping == [0, 1, 16, 17]
    assert p.infer == list(range(2, 16)) + list(range(18, 32))
    assert p.feeder == p.infer == p.isolate and p.feeder_priority == 10
    assert p.threads == 14
    # A background daemon (one registry row) gets the lowest weight on the housekeeping CPUs.
    docs = registry.Daemon(name="docs", module="x", summary="x", unit="onebox-docs.service", sections=(),
                           service="docs", placement="background")
    files = tune.render(topo, p, registry.DAEMONS + (docs,))
    cmdline = [ln for ln in files["onebox-kernel-cmdline.txt"].splitlines() if ln and not ln.startswith("#")]
    assert cmdline == ["irqaffinity=0-1,16-17 nohz_full=2-15,18-31 rcu_nocbs=2-15,18-31"]
    assert "CPUAffinity=0-1,16-17" in files["onebox-router.service.d/tune.conf"]
    assert "CPUWeight=50" in files["onebox-docs.service.d/tune.conf"]
    assert "CPUAffinity=0-1,16-17" in files["onebox-docs.service.d/tune.conf"]
    assert "Environment=ONEBOX__MODELS__%i__FEEDER_PRIORITY=10" in files["onebox-infer@.service.d/tune.conf"]


def test_two_nodes_keep_inference_on_the_gpu_node(tmp_path: Path) -> None:
    root = fake_box(tmp_path, cores=8, threads=1, nodes=2, gpus=[("NVIDIA H100 80GB HBM3", "0000:c1:00.0", 1)])
    topo = tune.read_topology(root, nvidia_smi=False)
    assert topo.gpus == (tune.Gpu("NVIDIA H100 80GB HBM3", "0000:c1:00.0", 1),)
    p = tune.plan(topo)
    assert p.node == 1
    assert p.housekeeping == [4] and p.infer == [5, 6, 7] and p.feeder == [5, 6, 7]
    assert p.background == [0, 1, 2, 3]  # the other node: no memory-bandwidth contention
    infer = tune.render(topo, p)["onebox-infer@.service.d/tune.conf"]
    assert "PrivateDevices=no" in infer and "DeviceAllow=/dev/nvidia0 rw" in infer


def test_emit_writes_dropins_systemd_understands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_box(tmp_path / "root", cores=4)
    out = tmp_path / "out"
    assert tune.main(["--root", str(root), "--emit", str(out)]) == 0
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    # One drop-in per registered daemon, nothing for daemons that do not exist.
    assert names == sorted([f"{d.unit}.d/tune.conf" for d in registry.DAEMONS] + ["onebox-kernel-cmdline.txt"])
    text = capsys.readouterr().out
    assert "4 CPUs, 4 cores" in text and "wrote" in text


def test_small_box_says_what_a_larger_one_gets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tune.main(["--root", str(fake_box(tmp_path, cores=2))]) == 0
    text = capsys.readouterr().out
    assert "too few to set any aside" in text
    assert "On a larger box" in text and "nohz_full=" in text


def test_example_rejects_nonsense() -> None:
    with pytest.raises(SystemExit):
        tune.main(["--example", "7x2"])


def test_plan_counts_the_inference_nodes_cores_not_the_boxs() -> None:
    # Four nodes of one core each: no node can spare a core, so nothing is set aside
    # (the box's 4 cores must not make it split a 1-core node into nothing).
    p = tune.plan(tune.example_topology(cores=4, threads_per_core=2, nodes=4))
    assert p.threads >= 1 and p.infer and p.isolate == []
    # A GPU on a CPU-less node: inference goes to a node that has CPUs.
    topo = tune.example_topology(cores=16, threads_per_core=2, nodes=2)
    with_gpu = tune.Topology(topo.cpus, (tune.Gpu("H100", "0000:c1:00.0", 7),))
    p = tune.plan(with_gpu)
    assert p.node in topo.nodes and p.threads >= 1 and p.infer and p.housekeeping
    assert set(p.infer).isdisjoint(p.housekeeping)

"""What `onebox tune` reads and recommends for this box, as the checks need it.

daemons/ctl/doctor_cmd.py builds it from daemons/ctl/tune.py (its topology reader, its
policy and its CPU-list syntax), so that this package never imports the commands: the
commands import it, and the layering stays one way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    bus: str   # PCI address as in /sys/bus/pci/devices (0000:01:00.0)
    node: int


@dataclass(frozen=True)
class Placement:
    describe: str               # "16 CPUs, 8 cores (2 thread(s) per core), 1 NUMA node(s); no GPU"
    node_of: dict[int, int]     # online CPU -> its NUMA node
    node: int                   # the node inference goes on (the GPU's, when it has CPUs)
    node_cores: int             # physical cores on that node
    min_cores: int              # fewer than this on the node and tune sets nothing aside
    isolate: frozenset[int]     # nohz_full= / rcu_nocbs= CPUs; empty on a small box
    housekeeping: frozenset[int]
    infer: frozenset[int]
    feeder_priority: int        # the SCHED_FIFO priority tune gives the feeder (0: none)
    kernel_line: str            # the parameters tune recommends, "" when none
    gpus: tuple[Gpu, ...]
    fmt: Callable[[list[int] | set[int]], str]  # CPU-list syntax: {0, 1, 2, 5} -> "0-2,5"

    @property
    def nodes(self) -> list[int]:
        return sorted(set(self.node_of.values()))

    def text(self, cpus: frozenset[int] | set[int]) -> str:
        return self.fmt(set(cpus))

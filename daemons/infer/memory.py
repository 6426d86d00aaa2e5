"""What one inference daemon will hold in memory, checked against the configured budget.

model (tensor bytes) + KV (cells x bytes per cell from the GGUF) + compute and output
buffers (what llama.cpp reserved for the largest step) + runtime (the process before
the model: the interpreter and libraries) + a fixed headroom for what the runtime grows
by while serving. The check runs twice: before the context exists (model +
KV, so an impossible config never allocates) and after (with the compute buffers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MIB = 2**20
# Grows after start: Python objects per request, token caches, thread stacks, ZeroMQ
# buffers. Part of the plan so the budget bounds peak RSS, not only llama.cpp's buffers.
RUNTIME_HEADROOM = 96 * MIB
# Cache type -> (elements per block, bytes per block): llama.cpp's block sizes.
KV_TYPES: dict[str, tuple[int, int]] = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}


def row_bytes(elements: int, kv_type: str) -> int:
    """Bytes of `elements` values in cache type `kv_type`; ValueError when they are not
    whole blocks (llama.cpp cannot make such a cache)."""
    block, size = KV_TYPES[kv_type]
    if elements % block:
        raise ValueError(f"{kv_type} stores blocks of {block} values; a row of {elements} is not whole blocks")
    return elements // block * size


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(budget_mb: int) -> int:
    return budget_mb * MIB if budget_mb > 0 else int(ram_bytes() * 0.8)


@dataclass(frozen=True)
class MemoryPlan:
    model: int
    kv_cells: int
    bytes_per_cell: int
    compute: int
    runtime: int
    budget: int

    @property
    def kv(self) -> int:
        return self.kv_cells * self.bytes_per_cell

    @property
    def total(self) -> int:
        return self.model + self.kv + self.compute + self.runtime + RUNTIME_HEADROOM

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def describe(self) -> str:
        compute = f"{self.compute / MIB:.0f} MiB" if self.compute else "not yet known"
        return (f"model {self.model / MIB:.0f} MiB + KV {self.kv / MIB:.0f} MiB ({self.kv_cells} cells x "
                f"{self.bytes_per_cell} B) + compute buffers {compute} + runtime {self.runtime / MIB:.0f} MiB "
                f"+ headroom {RUNTIME_HEADROOM / MIB:.0f} MiB = {self.total / MIB:.0f} MiB; "
                f"budget {self.budget / MIB:.0f} MiB")

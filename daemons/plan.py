"""The KV-cache planner's arithmetic (`onebox plan`): pure functions of a model's shape.

A KV cell is one token of context in every layer: per layer, n_head_kv heads of
key_length values of K and of value_length values of V, stored in the cache type's
blocks (llama.cpp's ggml_row_size; it refuses a quantized type whose blocks do not
divide a head). For a model whose every layer has the same KV heads this is the
daemon's own formula (daemons/infer/native.py KvShape: layers x KV heads x (key +
value) x bytes per value of its kv_type), which is what it checks its budget with at
start; the totals go through the daemon's MemoryPlan so the two add up the same way.

Compute buffers are an estimate, from the shape of llama.cpp's graph (see
compute_estimate); everything else is exact arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemons.infer.memory import KV_TYPES, MIB, MemoryPlan, row_bytes

# llama.cpp rounds the KV cache up to a multiple of this many cells (llama 0.3.36: 1000
# cells asked, 1024 allocated), so a kv_tokens of such a multiple is what it allocates.
CELL_PAD = 256
# [models.NAME] slots is at most this (daemons/config/models.py).
MAX_SLOTS = 128
# onebox-infer's RSS before it loads a model (Python, llama-cpp-python, ZeroMQ): measured
# at 45 MiB on this checkout (the daemon logs it as "runtime"); rounded up.
RUNTIME_ESTIMATE = 48 * MIB
# The vocabulary assumed for the logits buffers when no GGUF says (Llama 3's).
ASSUMED_VOCAB = 128_256
F32 = 4


@dataclass(frozen=True)
class Arch:
    """What the plan needs of a model. Per-layer tuples have one entry per layer; 0 means
    not known (n_embd, n_ff, n_vocab, n_ctx_train)."""

    n_layer: int
    n_head_kv: tuple[int, ...]
    key_length: int
    value_length: int
    n_head: int = 0
    n_embd: int = 0
    n_ff: int = 0
    n_vocab: int = 0
    n_ctx_train: int = 0
    n_swa: int = 0
    swa_layers: tuple[bool, ...] | None = None  # which layers slide; None: not known
    recurrent: bool = False

    @classmethod
    def uniform(cls, n_layer: int, n_head_kv: int, head_dim: int, value_dim: int | None = None,
                n_vocab: int = 0) -> Arch:
        return cls(n_layer, (n_head_kv,) * n_layer, head_dim, value_dim or head_dim, n_head=n_head_kv,
                   n_vocab=n_vocab)

    @property
    def per_layer_heads(self) -> bool:
        return len(set(self.n_head_kv)) > 1


def head_bytes(arch: Arch, kv_type: str) -> int:
    """One KV head's K and V in one layer; ValueError when a head is not whole blocks
    (llama.cpp checks each head: "does not divide n_embd_head_k")."""
    return row_bytes(arch.key_length, kv_type) + row_bytes(arch.value_length, kv_type)


def bytes_per_cell(arch: Arch, kv_type: str = "f16") -> int:
    """What llama.cpp allocates per cell: every layer's K and V rows. With swa_full (its
    default, which onebox leaves on) sliding-window layers get full-size caches too."""
    return sum(arch.n_head_kv) * head_bytes(arch, kv_type)


def daemon_bytes_per_cell(arch: Arch, kv_type: str) -> int:
    """The daemon's own figure (KvShape.bytes_per_cell): layer 0's KV heads in every
    layer, in `kv_type`. Equal to bytes_per_cell(arch, kv_type) unless the heads vary by
    layer."""
    return arch.n_layer * arch.n_head_kv[0] * head_bytes(arch, kv_type)


def pad_cells(cells: int) -> int:
    return -(-cells // CELL_PAD) * CELL_PAD


def kv_cells(users: int, ctx: int, prefix: int = 0) -> int:
    """Cells for `users` full contexts of `ctx` tokens whose first `prefix` tokens are the
    same: the prefix cells are held once (the batch engine shares them by seq_cp)."""
    return prefix + users * (ctx - prefix) if users > 0 else 0


def rotated(arch: Arch, kv_type: str) -> bool:
    """Whether llama.cpp rotates K and V (a Hadamard transform of queries, keys, values
    and the attention output, which makes their quantization error smaller) for this
    cache type: a quantized one with heads a multiple of 64 ("attn_rot_k = 1" in its log;
    LLAMA_ATTN_ROT_DISABLE=1 in the environment turns it off)."""
    return KV_TYPES[kv_type][0] > 1 and arch.key_length % 64 == 0


def compute_estimate(arch: Arch, step_tokens: int, n_kv: int, n_seq_max: int, flash_attn: bool,
                     kv_type: str = "f16") -> int:
    """Compute + output buffers llama.cpp reserves, estimated from its graph.

    Output: logits for each of n_seq_max sequences (n_vocab f32 each), reserved up front.
    Compute: llama.cpp's allocator reuses memory, so it is the largest set of tensors alive
    at once in a step of `step_tokens` (n_ubatch) tokens, in f32 units per token: at the
    output, the logits (n_vocab) and two n_embd rows (three without flash attention); in a
    layer with flash attention, the f16 mask (n_kv / 2) and the FFN's and attention's rows
    (3 n_ff + 4 n_embd); without it, the attention scores and the f32 mask
    (n_kv x (n_head + 1)) and six n_embd rows. Checked against llama.cpp 0.3.36 with
    SmolLM2-135M (steps of 64-512 tokens, 1-64 sequences, 512-196,608 cells, flash
    attention on and off): within 0.2% each time. The n_embd and n_ff multiples were fitted
    on that one model, so a model whose FFN is the peak is the least checked. A rotated
    quantized cache (rotated()) adds the rotated queries, n_head x key_length per token
    (q8_0 and q4_0 with the same model: within 0.2% for steps of 64-512 tokens and 4,096
    cells or more; with fewer cells llama.cpp's allocator is less regular, and the
    estimate, f16's too, up to 4% off).
    """
    vocab = arch.n_vocab or ASSUMED_VOCAB
    output = vocab * F32 * n_seq_max
    if flash_attn:
        logits = vocab + 2 * arch.n_embd
        layer = n_kv // 2 + 3 * arch.n_ff + 4 * arch.n_embd
    else:
        logits = vocab + 3 * arch.n_embd
        layer = n_kv * ((arch.n_head or max(arch.n_head_kv)) + 1) + 6 * arch.n_embd
    rotation = (arch.n_head or max(arch.n_head_kv)) * arch.key_length if rotated(arch, kv_type) else 0
    return output + F32 * step_tokens * (max(logits, layer) + rotation)


@dataclass(frozen=True)
class Sizing:
    """One model served by one inference daemon: everything but how many users."""

    arch: Arch
    kv_type: str = "f16"
    model_bytes: int | None = None  # None: the weights' size is not known
    step_tokens: int = 256
    cached_prefixes: int = 32
    flash_attn: bool = True
    runtime: int = RUNTIME_ESTIMATE
    # Bytes per cell to plan with when it is not the cache type's own: the daemon's start
    # check counts layer 0's KV heads in every layer, and must pass too.
    cell_bytes: int | None = None

    @property
    def bytes_per_cell(self) -> int:
        return self.cell_bytes or bytes_per_cell(self.arch, self.kv_type)

    def memory(self, kv_tokens: int, slots: int, budget: int) -> MemoryPlan:
        """The daemon's MemoryPlan for a [models.X] with these kv_tokens and slots, with
        the compute buffers estimated (step_tokens is raised to slots, as the config must)."""
        compute = compute_estimate(self.arch, max(self.step_tokens, slots), pad_cells(kv_tokens),
                                   slots + self.cached_prefixes, self.flash_attn, self.kv_type)
        return MemoryPlan(model=self.model_bytes or 0, kv_cells=kv_tokens, bytes_per_cell=self.bytes_per_cell,
                          compute=compute, runtime=self.runtime, budget=budget)

    def for_users(self, users: int, ctx: int, prefix: int, budget: int) -> MemoryPlan:
        """`users` contexts of `ctx` tokens held at once (at most MAX_SLOTS decode together;
        the output buffers are for those), kv_tokens rounded up as llama.cpp allocates."""
        return self.memory(pad_cells(kv_cells(users, ctx, prefix)), min(users, MAX_SLOTS), budget)

    def users_fit(self, ctx: int, prefix: int, budget: int) -> int:
        """The most users of `ctx` tokens whose whole plan fits `budget` (0 if none)."""
        per_user = (ctx - prefix) * self.bytes_per_cell
        if not self.for_users(1, ctx, prefix, budget).fits:
            return 0
        lo, hi = 1, budget // per_user + 2  # the KV alone rules out hi
        while hi - lo > 1:  # total grows with users: the largest that fits
            mid = (lo + hi) // 2
            if self.for_users(mid, ctx, prefix, budget).fits:
                lo = mid
            else:
                hi = mid
        return lo


def recommend(sizing: Sizing, users: int, ctx: int, prefix: int) -> dict[str, int]:
    """The [models.X] keys for `users` users of `ctx` tokens: slots (at most MAX_SLOTS; the
    rest wait for a slot) and the cells those slots need, rounded up as llama.cpp does."""
    slots = min(users, MAX_SLOTS)
    settings = {"n_ctx": ctx, "slots": slots, "kv_tokens": pad_cells(kv_cells(slots, ctx, prefix))}
    if slots > sizing.step_tokens:  # the config requires slots <= step_tokens
        settings["step_tokens"] = slots
    return settings

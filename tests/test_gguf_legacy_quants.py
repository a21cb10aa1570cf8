"""GGUF Q4_1, Q5_0, Q5_1 and IQ4_NL kept quantized: dequantization against gguf's reference (bit for bit), the native
GEMV against the same integer math in float64 and against fp32 activations within their rounding, a tiny model's
logits against the same model loaded dequantized, and the load-time fallback to float weights without the SIMD GEMV."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from edgellm.kernels import ggml_blocks
from edgellm.kernels.ggml_blocks import (
    GGUF_ONLY_LINEAR,
    block_mins,
    block_quants,
    block_scales,
    blocks_linear_reference,
    gemv_simd,
    quantize_activations,
    quantize_activations_q8_1,
)
from edgellm.kernels.native import cpu_flags, cpu_has_native_bf16
from edgellm.layouts import GGUF_ONLY_BLOCK_BYTES
from edgellm.quant import QuantFormatError, QuantizedLinear, QuantizedTensor, WeightFormat, gguf_read, qmatmul, quantize
from edgellm.quant.gguf import hf_name, qk_heads, unpermute_qk
from edgellm.quant.gguf_read import load_gguf
from edgellm.quant.gguf_write import export_gguf
from tests.test_gguf import HEADS, KV_HEADS, logits, reference_with, rewrite
from tests.test_kquants import random_blocks

KINDS = list(GGUF_ONLY_BLOCK_BYTES)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def make_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, k/32 * bytes): gguf's own quantizer on normal weights, or for IQ4_NL (which gguf cannot quantize)
    random codes with an fp16 d of about 1/127, the scale its quantizer would give."""
    rng = np.random.default_rng(seed)
    if kind != "iq4_nl":
        return gguf_quantize(rng.standard_normal((n, k)).astype(np.float32), GT[kind.upper()])
    b = rng.integers(0, 256, (n, k // 32, 18), dtype=np.uint8)
    b[..., :2] = (rng.uniform(0.5, 1.5, b.shape[:2]) / 127).astype(np.float16)[..., None].view(np.uint8)
    return b.reshape(n, -1)


def gguf_weight(blocks: np.ndarray, kind: str, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(blocks, GT[kind.upper()])).reshape(-1, k)


def magnitude(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The GEMV's sum of absolute terms (float64), what its fp32 rounding error is relative to."""
    xq, dx, sx = quantize_activations_q8_1(x)
    dot = torch.einsum("mbi,nbi->mnb", xq.abs().double(), block_quants(blocks, kind).abs().double())
    y = (dot * (block_scales(blocks, kind).abs().double()[None] * dx.abs().double()[:, None])).sum(-1)
    if kind in ("q4_1", "q5_1"):
        y = y + sx.abs().double() @ block_mins(blocks, kind).abs().double().T
    return y


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_is_bit_exact_against_gguf(kind):
    k, n = 160, 12
    blocks = make_blocks(kind, n, k, seed=1)
    if kind == "iq4_nl":  # every code in every nibble position, and a negative scale
        blocks[0, 2:18] = np.arange(16, dtype=np.uint8) * 17
        blocks[1, :2] = np.frombuffer(np.float16(-0.5).tobytes(), np.uint8)
    want = gguf_weight(blocks, kind, k).numpy().view(np.uint32)
    qt = QuantizedTensor(WeightFormat.gguf(kind), (n, k), {"blocks": torch.from_numpy(blocks)})
    assert np.array_equal(qt.dequantize().numpy().view(np.uint32), want)
    assert np.array_equal(qt.rows(3, 9).dequantize().numpy().view(np.uint32), want[3:9])


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "mxfp4", *KINDS])
def test_native_dequantize_matches_the_pytorch_reference(kind):
    """The native dequantize (prefill's dequant + GEMM reads it) in fp32, bit for bit, and in bf16 as its rounding."""
    if ggml_blocks.native_dequantize(torch.zeros(1, 34, dtype=torch.uint8), 32, "q8_0", torch.float32) is None:
        pytest.skip("native kernels not built")
    k, n = 160, 12
    blocks = torch.from_numpy(make_blocks(kind, n, k, seed=2)) if kind in KINDS else \
        quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(2)), kind).data["blocks"]
    want = ggml_blocks.blocks_dequantize_reference(blocks, k, kind)
    assert torch.equal(ggml_blocks.native_dequantize(blocks, k, kind, torch.float32), want)
    assert torch.equal(ggml_blocks.native_dequantize(blocks, k, kind, torch.bfloat16), want.bfloat16())
    assert torch.equal(ggml_blocks.native_dequantize(blocks[3:9], k, kind, torch.float32), want[3:9])
    buf = torch.full((8 * k,), float("nan"), dtype=torch.bfloat16)  # a reused buffer: every element overwritten
    got = ggml_blocks.native_dequantize(blocks[2:8], k, kind, torch.bfloat16, buf[:6 * k])
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want[2:8].bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matmul_over_row_chunks_matches_one_matmul(dtype, monkeypatch):
    """dequant_linear dequantizes a few rows at a time into one reused buffer: with chunks of 5 rows (a partial
    last one) the product equals one matmul against the whole dequantized weight."""
    k, n = 96, 23
    qt = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(3)), "q4_0")
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    wdtype = dtype if dtype == torch.float32 or cpu_has_native_bf16() else torch.float32
    want = torch.nn.functional.linear(x.to(wdtype), qt.dequantize(wdtype)).float()
    monkeypatch.setattr(qmatmul, "DEQUANT_CHUNK_ELEMENTS", 5 * k)
    torch.testing.assert_close(qmatmul.dequant_linear(x, qt), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qmatmul.dequant_linear(x, qt), want, rtol=1e-5, atol=1e-5)  # the buffer again


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("k", [32, 96, 160, 576])  # blocks after the last whole VNNI step: 1, 1 or 3, 1, 0 or 2
def test_q8_0_and_q4_0_rows_with_blocks_past_the_last_step_match_the_integer_reference(kind, k):
    w = torch.randn(33, k, generator=torch.Generator().manual_seed(k))
    blocks = quantize(w, kind).data["blocks"]
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k + 1))
    y = (ggml_blocks.q8_0_linear if kind == "q8_0" else ggml_blocks.q4_0_linear)(x, blocks, k)
    ref = blocks_linear_reference(x, blocks, k, kind)
    assert (y - ref).abs().max() <= 1e-6 * k * ref.abs().max()


def test_formats_are_registered_for_reading_only():
    assert [WeightFormat.gguf(k).bits for k in KINDS] == [4, 5, 5, 4]
    fmt = WeightFormat.gguf("Q5_1")
    assert (fmt.kind, fmt.group, fmt.bits_per_weight, fmt.read_only) == ("q5_1", 32, 6.0, True)
    assert fmt.data_shapes(8, 64) == {"blocks": ((8, 48), torch.uint8)}
    with pytest.raises(QuantFormatError, match="unknown weight format 'iq4_nl'"):
        WeightFormat.parse("iq4_nl")
    with pytest.raises(QuantFormatError, match="does not quantize to it"):
        quantize(torch.randn(8, 64), WeightFormat.gguf("q4_1"))
    with pytest.raises(QuantFormatError, match="no unpacked-code form"):
        QuantizedTensor(fmt, (8, 64), {"blocks": torch.zeros(8, 48, dtype=torch.uint8)}).unpacked_codes()


def test_q8_1_sums_round_as_llama_cpp():
    """s = fp16(sum(q) * d) from the fp32 d, not the fp16 one; a Q4_1 weight of all ones (d = 0, m = 1) reads it."""
    k = 160  # four blocks in one SIMD step, then one in the plain C++ tail
    # seeded: about one draw in six has every fp16-d sum round like the fp32-d one, and the check below needs a miss
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, k)
    x[1, :32] = 0.0
    q, d, s = quantize_activations_q8_1(x)
    assert torch.equal(q, quantize_activations(x)[0]) and torch.equal(d, quantize_activations(x)[1])
    d32 = x.view(2, -1, 32).abs().amax(-1) / 127
    assert torch.equal(s, (q.sum(-1) * d32).half().float()) and s[1, 0] == 0
    assert not torch.equal(s, (q.sum(-1) * d).half().float())  # the fp16 d would differ somewhere
    ones = np.zeros((1, k // 32, 20), dtype=np.uint8)
    ones[..., 2:4] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    y = GGUF_ONLY_LINEAR["q4_1"](x, torch.from_numpy(ones.reshape(1, -1)), k)
    torch.testing.assert_close(y[:, 0].double(), s.double().sum(-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("k", "n"), [(32, 7), (160, 33), (4096, 64)])  # no whole SIMD step, a tail, many steps
def test_gemv_matches_the_integer_reference_and_fp32(kind, k, n):
    blocks = torch.from_numpy(make_blocks(kind, n, k, seed=k + n))
    w = gguf_weight(blocks.numpy(), kind, k).double()
    for m in (1, 5):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * torch.logspace(-1, 1, k)
        y = GGUF_ONLY_LINEAR[kind](x, blocks, k)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        want = blocks_linear_reference(x.double(), blocks, k, kind)
        assert ((y.double() - want).abs() <= 1e-6 * magnitude(x, blocks, kind)).all()
        # against fp32 x: each x moves by at most half its block's step (d before fp16 rounding, plus that rounding)
        step = x.view(m, -1, 32).abs().amax(-1).double() / 127 * (1 + 2**-10)
        bound = (step.repeat_interleave(32, 1) / 2) @ w.abs().T + 1e-5 * (x.abs().double() @ w.abs().T)
        if kind in ("q4_1", "q5_1"):  # and s = sum(q) * d is rounded to fp16 once more
            bound += 2**-11 * quantize_activations_q8_1(x)[2].abs().double() @ block_mins(blocks, kind).abs().double().T
        assert ((y.double() - x.double() @ w.T).abs() <= bound).all()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "mxfp4", *KINDS])
def test_tiled_gemm_matches_the_integer_reference(kind):
    """Eight rows and more run the tiled int8 GEMM (bgemm.h): tiles of 32 weight rows (a last one of 6 or 13) in
    pairs of blocks (17 blocks leave one alone) against 6 rows of x at a time (tails of 1-5). Each output is the
    integer math in float64 within fp32 rounding, the same for bf16 x as for its fp32 copy, on 2 threads as on 1."""
    linear = qmatmul.BLOCK_LINEAR[kind]
    for n, k, m in ((70, 576, 8), (45, 544, 13), (32, 1024, 27)):
        gen = torch.Generator().manual_seed(n)
        if kind in KINDS:
            blocks = torch.from_numpy(make_blocks(kind, n, k, seed=n))
        else:
            blocks = quantize(torch.randn(n, k, generator=gen), kind).data["blocks"]
        x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, k)
        y = linear(x, blocks, k)
        want = blocks_linear_reference(x.double(), blocks, k, kind)
        assert ((y.double() - want).abs() <= 1e-6 * magnitude(x, blocks, kind)).all()
        xb = x.bfloat16()
        assert torch.equal(linear(xb, blocks, k), linear(xb.float(), blocks, k).bfloat16())
        torch.set_num_threads(2)
        try:
            assert torch.equal(linear(x, blocks, k), y)
        finally:
            torch.set_num_threads(1)


def test_bf16_prefill_takes_the_tiled_gemm_from_its_crossover():
    """Q4_0 keeps the table lookup for few bf16 rows and takes the tiled GEMM from TILED_MIN_ROWS on (where the
    CPU runs it); fp32 rows keep the exact dequantize + GEMM past the lookup's range."""
    qt = quantize(torch.randn(64, 256), "q4_0")
    lut = qmatmul.prepare_lut(qt)
    tiled = qmatmul.tiled_gemm("q4_0")
    rows = qmatmul.TILED_MIN_ROWS
    assert qmatmul.kernel_for(qt, rows, lut, torch.bfloat16) == ("vnni" if tiled else qmatmul.kernel_for(qt, rows, lut))
    assert qmatmul.kernel_for(qt, 4096, lut) == "dequant"
    if lut is not None:
        assert qmatmul.kernel_for(qt, rows - 1, lut, torch.bfloat16) == "lut"


def test_gemv_runs_bf16_and_the_pytorch_fallback(monkeypatch):
    k = 96
    blocks = torch.from_numpy(make_blocks("q5_1", 10, k))
    x = torch.randn(2, 3, k, dtype=torch.bfloat16)
    y = GGUF_ONLY_LINEAR["q5_1"](x, blocks, k)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 10)
    monkeypatch.setattr(ggml_blocks, "_ext", lambda: None)
    torch.testing.assert_close(GGUF_ONLY_LINEAR["q5_1"](x, blocks, k), y)
    assert not gemv_simd("q5_1")


def test_simd_flag_follows_the_build():
    flags = set(cpu_flags().split())
    simd = {"avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni"} <= flags
    if ggml_blocks.vnni_available():  # built with -march=native, so the flag is the CPU's
        assert gemv_simd("q4_1") == gemv_simd("q4_k") == simd


def legacy_gguf(checkpoint, tmp_path, types: dict[str, GT]) -> tuple:
    """A tiny llama GGUF written by the gguf package with each projection (by GGUF part name) and the output head in
    the given type: gguf's quantization of the real weights (IQ4_NL: random blocks); and gguf's dequantization of
    every block, by HF name."""
    path = checkpoint("llama")
    base = export_gguf(path, tmp_path / "f32.gguf", "f32")
    stored = {t.name: t for t in gguf.GGUFReader(base).tensors}
    replace, expected = {}, {}
    for seed, name in enumerate(stored):
        part = name.split(".")[-2]
        if part not in types or stored[name].data.ndim != 2:
            continue
        qtype = types[part]
        rows, k = stored[name].data.shape
        if qtype == GT.IQ4_NL:
            blocks = make_blocks("iq4_nl", rows, k, seed=seed)
            blocks.reshape(rows, -1, 18)[..., :2] = (np.float16(0.02 / 127) * np.ones((rows, k // 32, 1))).astype(
                np.float16).view(np.uint8)
        else:
            blocks = gguf_quantize(np.ascontiguousarray(stored[name].data), qtype)
        replace[name] = (blocks, qtype)
        w = torch.from_numpy(gguf_dequantize(blocks, qtype)).reshape(rows, k)
        hf = hf_name(name)
        heads = qk_heads(hf, HEADS, KV_HEADS)
        expected[hf] = unpermute_qk(w, heads) if heads else w
    return path, rewrite(base, tmp_path / "legacy.gguf", replace=replace), replace, expected


TYPES = {"attn_q": GT.Q4_1, "attn_k": GT.Q5_0, "attn_v": GT.Q5_1, "attn_output": GT.IQ4_NL, "ffn_gate": GT.Q5_0,
         "ffn_up": GT.Q4_1, "ffn_down": GT.Q5_1, "output": GT.Q5_0}


def test_tiny_model_keeps_blocks_and_matches_the_dequantized_load(checkpoint, tmp_path, monkeypatch):
    torch.manual_seed(0)
    tokens = torch.randint(0, 384, (1, 24))
    path, gguf_path, replace, expected = legacy_gguf(checkpoint, tmp_path, TYPES)
    model, _ = load_gguf(gguf_path, "fp32")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    names = {m: getattr(attn if m.endswith("proj") and m[0] in "qkvo" else mlp, m).fmt.name
             for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert names == {"q_proj": "q4_1", "k_proj": "q5_0", "v_proj": "q5_1", "o_proj": "iq4_nl", "gate_proj": "q5_0",
                     "up_proj": "q4_1", "down_proj": "q5_1"}
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.fmt.name == "q5_0"
    assert np.array_equal(mlp.down_proj.blocks.numpy(), replace["blk.1.ffn_down.weight"][0])  # the file's bytes
    assert np.array_equal(model.lm_head.blocks.numpy(), replace["output.weight"][0])
    assert not [n for n, _ in model.named_parameters() if "proj" in n or "lm_head" in n]
    ref = logits(reference_with(path, lambda name, w: expected.get(name, w)), tokens)
    got = logits(model, tokens)  # 24 rows: the int8 GEMV
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=1e-5)  # the same weights
    monkeypatch.setattr(qmatmul, "dequant_linear", lambda x2, qt: blocks_linear_reference(
        x2.double(), qt.data["blocks"], qt.shape[1], qt.fmt.kind).float())
    emulated = logits(model, tokens)  # every quantized matmul as the GEMV's integer math, in float64
    # The GEMV's departure from the exact logits is its activation rounding: it sits at the same rounding done in
    # float64 up to fp32 summation order (measured 5e-6 of that departure), far from the exact logits.
    assert 0 < (got - emulated).norm() <= 1e-3 * (emulated - ref).norm()
    assert (got - ref).norm() <= 0.1 * ref.norm()


def test_without_the_simd_gemv_the_types_load_as_float_weights(checkpoint, tmp_path, monkeypatch):
    """The fallback routing: the portable GEMV (and dequantizing per call) is slower than a float weight, so a build
    without the SIMD path loads these types, and the k-quants, dequantized as before; Q8_0 stays as blocks."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 384, (1, 8))
    types = {"attn_q": GT.Q4_1, "attn_k": GT.Q8_0, "attn_v": GT.IQ4_NL, "ffn_up": GT.Q5_1, "output": GT.Q5_0}
    path, gguf_path, _, expected = legacy_gguf(checkpoint, tmp_path, types)
    monkeypatch.setattr(gguf_read, "gemv_simd", lambda kind: False)
    model, _ = load_gguf(gguf_path, "fp32")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, torch.nn.Linear) and isinstance(attn.v_proj, torch.nn.Linear)
    assert isinstance(attn.k_proj, QuantizedLinear) and attn.k_proj.fmt.name == "q8_0"
    assert torch.equal(attn.q_proj.weight, expected["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, expected["model.layers.1.mlp.up_proj.weight"])
    assert model.lm_head.fmt.name == "q8_0"  # a float head, requantized to Q8_0 as before
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    head = expected.pop("lm_head.weight")
    ref = reference_with(path, lambda name, w: expected.get(name, w))
    ref.lm_head.weight.data = QuantizedTensor(WeightFormat.parse("q8_0"), tuple(head.shape), {
        "blocks": torch.from_numpy(gguf_quantize(head.numpy(), GT.Q8_0))}).dequantize()
    torch.testing.assert_close(logits(model, tokens), logits(ref, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", [GT.Q5_1, GT.IQ4_NL, GT.Q4_K, GT.Q6_K, GT.Q8_0])
@pytest.mark.parametrize("simd", [True, False])
def test_read_tensor_keeps_blocks_only_with_the_simd_gemv(qtype, simd, monkeypatch, tmp_path):
    """Q8_0 was kept as blocks before the SIMD flag existed and still is; the types that were loaded as floats before
    they had a kernel stay floats where the kernel would run its portable path."""
    monkeypatch.setattr(gguf_read, "gemv_simd", lambda kind: simd)
    kind = qtype.name.lower()
    raw = random_blocks(kind, 4, 256, scale=1e-3) if kind.endswith("_k") else make_blocks(kind, 4, 256)
    t = gguf_read.GGUFTensor("blk.0.attn_q.weight", qtype, (4, 256), raw)
    w = gguf_read.read_tensor(t, torch.float32, tmp_path / "m.gguf", keep_quantized=True)
    if simd or qtype == GT.Q8_0:
        assert isinstance(w, QuantizedTensor) and np.array_equal(w.data["blocks"].numpy(), raw)
    else:
        assert torch.equal(w, torch.from_numpy(gguf_dequantize(raw, qtype)).reshape(4, 256))

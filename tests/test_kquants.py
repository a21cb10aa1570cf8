"""GGUF k-quants kept quantized: block dequantization against gguf's reference (bit for bit), Q8_K activations
against llama.cpp's rounding, and the native GEMV (AVX-512 VNNI and portable paths) against the same integer math in
PyTorch and against fp32 activations within the activation quantization error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize as gguf_dequantize

from edgellm.kernels import ggml_blocks
from edgellm.kernels.ggml_blocks import (
    BlockFormatError,
    kquant_dequantize,
    kquant_dequantize_reference,
    kquant_linear,
    kquant_linear_reference,
    kquant_parts,
    quantize_activations_q8k,
    vnni_available,
)
from edgellm.quant import QuantFormatError, QuantizedLinear, QuantizedTensor, WeightFormat, qmatmul, quantize
from edgellm.quant.formats import KQUANT_BLOCK_BYTES

KINDS = list(KQUANT_BLOCK_BYTES)
SCALE_OFFSETS = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # fp16 d, dmin
MIN_RATIO = {"q2_k": 1.5, "q4_k": 7.5, "q5_k": 15.5}  # dmin / d that centres (u - dmin/d) on zero when m == sc


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def gguf_type(kind: str) -> GT:
    return GT[kind.upper()]


def random_blocks(kind: str, n: int, k: int, seed: int = 0, scale: float | None = None) -> np.ndarray:
    """Valid k-quant blocks uint8 (n, k/256 * bytes): random codes and sub-block scales; the fp16 d (and dmin) any
    finite value (scale None) or about `scale`, with each sub-block's min equal to its scale and dmin chosen so the
    weights centre on zero (gguf cannot quantize to k-quants, and random blocks are as valid as quantized ones)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, k // 256, KQUANT_BLOCK_BYTES[kind]), dtype=np.uint8)
    if scale is None:
        bits = rng.integers(0, 0x7C00, (*b.shape[:2], len(SCALE_OFFSETS[kind])), dtype=np.uint16)  # finite, >= 0
        bits |= rng.integers(0, 2, bits.shape, dtype=np.uint16) << 15
        for i, off in enumerate(SCALE_OFFSETS[kind]):
            b[..., off:off + 2] = bits[..., i:i + 1].view(np.uint8)
        return b.reshape(n, -1)
    d = (scale * rng.uniform(0.5, 1.5, b.shape[:2])).astype(np.float16)
    b[..., SCALE_OFFSETS[kind][0]:SCALE_OFFSETS[kind][0] + 2] = d[..., None].view(np.uint8)
    if kind in MIN_RATIO:  # m_j = sc_j: equal nibbles (Q2_K) or equal scale and min fields (Q4_K, Q5_K)
        if kind == "q2_k":
            b[..., :16] = (b[..., :16] & 15) * 17
        else:  # the 12 scale bytes s = b[4:16]: s[4:8] = s[0:4], and s[8:12] with equal nibbles
            b[..., 8:12] = b[..., 4:8]
            b[..., 12:16] = (b[..., 12:16] & 15) * 17
        dmin = (d.astype(np.float32) * MIN_RATIO[kind]).astype(np.float16)
        b[..., SCALE_OFFSETS[kind][1]:SCALE_OFFSETS[kind][1] + 2] = dmin[..., None].view(np.uint8)
    return b.reshape(n, -1)


def reference_weight(blocks: np.ndarray, kind: str, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(blocks, gguf_type(kind))).reshape(-1, k)


def magnitude(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The GEMV's sum of absolute terms (float64), what its fp32 rounding error is relative to."""
    xq, dx, bsums = quantize_activations_q8k(x)
    u, sc, m, d, dmin, offset = kquant_parts(blocks, kind)
    n = blocks.shape[0]
    dots = torch.einsum("mbji,nbji->mnbj", xq.abs().double().view(*xq.shape[:2], 16, 16),
                        u.double().view(n, -1, 16, 16))
    isum = (sc.abs().double() * (dots + offset * bsums.abs().double()[:, None])).sum(-1)
    msum = (m.double() * bsums.abs().double()[:, None]).sum(-1)
    return (dx.abs().double()[:, None] * (d.abs().double() * isum + dmin.abs().double() * msum)).sum(-1)


BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_is_bit_exact_against_gguf(kind, portable):
    """The native dequantization (AVX-512 where built, or the portable C++ path) of blocks with any finite d and
    dmin: in fp32 gguf's weight bit for bit (signed zeros included), in bf16 that rounded to nearest even."""
    k = 768
    blocks = random_blocks(kind, 40, k, seed=1)
    want = reference_weight(blocks, kind, k)
    b = torch.from_numpy(blocks)
    assert torch.equal(kquant_dequantize_reference(b, k, kind).view(torch.int32), want.view(torch.int32))
    for dtype in BITS:
        got = kquant_dequantize(b, k, kind, dtype, portable=portable)
        assert got.dtype == dtype and torch.equal(got.view(BITS[dtype]), want.to(dtype).view(BITS[dtype]))
    qt = QuantizedTensor(WeightFormat.gguf(kind), (40, k), {"blocks": b})
    assert torch.equal(qt.rows(3, 9).dequantize().view(torch.int32), want[3:9].view(torch.int32))


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_of_non_finite_scales_matches_the_portable_path(kind):
    """An infinite or NaN d (or dmin) makes infinities and NaNs; the AVX-512 path, whose bf16 conversion would keep
    a NaN's sign and payload, writes them bit for bit as the portable path (c10's NaN, 0x7fc0, in bf16)."""
    k = 512
    blocks = random_blocks(kind, 6, k, seed=5)
    per_block = blocks.reshape(6, 2, -1)
    for i, bits in enumerate((0x7C00, 0xFC00, 0x7E00, 0xFE01)):  # +inf, -inf, NaN, -NaN
        off = SCALE_OFFSETS[kind][i % len(SCALE_OFFSETS[kind])]
        per_block[i, i % 2, off:off + 2] = np.array([bits], np.uint16).view(np.uint8)
    b = torch.from_numpy(blocks)
    for dtype, bits in BITS.items():
        got = kquant_dequantize(b, k, kind, dtype)
        assert got.isnan().any() and torch.equal(got.view(bits), kquant_dequantize(b, k, kind, dtype, True).view(bits))


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_dequantize_into_a_buffer_is_gguf_rounded(kind):
    """Prefill dequantizes row chunks to bf16 into one reused buffer: each chunk is gguf's fp32 weight rounded to
    bf16 (NaN-free finite inputs), whatever the buffer held before."""
    k = 512
    blocks = random_blocks(kind, 24, k, seed=2)
    want = reference_weight(blocks, kind, k).bfloat16()
    qt = QuantizedTensor(WeightFormat.gguf(kind), (24, k), {"blocks": torch.from_numpy(blocks)})
    buf = torch.full((10 * k,), float("nan"), dtype=torch.bfloat16)
    for start in (0, 10, 20):
        rows = qt.rows(start, start + 10)
        got = rows.dequantize(torch.bfloat16, buf[:rows.shape[0] * k].view(rows.shape[0], k))
        assert got.data_ptr() == buf.data_ptr()
        assert torch.equal(got.view(torch.int16), want[start:start + 10].view(torch.int16))


def test_formats_are_registered_for_reading_only():
    fmt = WeightFormat.gguf("Q4_K")
    assert (fmt.kind, fmt.bits, fmt.group, fmt.bits_per_weight) == ("q4_k", 4, 256, 4.5)
    assert WeightFormat.gguf("q6_k").bits_per_weight == 6.5625 and WeightFormat.gguf("q8_0").group == 32
    with pytest.raises(QuantFormatError, match="unknown weight format 'q4_k'"):  # not a format to quantize to
        WeightFormat.parse("q4_k")
    assert fmt.data_shapes(8, 512) == {"blocks": ((8, 288), torch.uint8)}
    with pytest.raises(QuantFormatError, match="multiple of 256"):
        fmt.check_shape((8, 320))
    with pytest.raises(QuantFormatError, match="does not quantize to it"):
        quantize(torch.randn(8, 256), fmt)


def selection_blocks(k: int) -> torch.Tensor:
    """Q2_K rows e = 0..k-1 with w[e] = 1 and every other weight 0 (d = 1, sc = 1, m = 0), so y = d_x * q_x."""
    b = np.zeros((k, k // 256, 84), dtype=np.uint8)
    b[..., :16] = 1
    b[..., 80:82] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    for e in range(k):
        i = e % 256
        b[e, e // 256, 16 + 32 * (i // 128) + i % 32] = 1 << (2 * (i // 32 % 4))
    return torch.from_numpy(b.reshape(k, -1))


@pytest.mark.parametrize("rows", [6, 10])  # the multi-row kernel's quantizer, and the tiled GEMM's vectorised one
@pytest.mark.parametrize("portable", [False, True])
def test_q8k_activations_round_as_llama_cpp(portable, rows):
    k = 512
    x = torch.randn(rows, k)
    x[1, :256] = torch.arange(256) % 9 - 4.5  # iscale = -127 / -4.5 ...
    x[1, 256:] = torch.arange(256) % 5 + 0.5
    x[1, 300] = -127.0  # ... and -127 / -127 = 1: every x.5 is a tie, rounded to even
    x[2, 10], x[2, 20] = 7.0, -7.0  # equal magnitudes: the first one's sign sets d's
    x[3, :256] = 0.0  # an all-zero block
    x[4, 255], x[4, 511] = -50.0, 60.0  # the peak at a block's last element
    x[5] *= 1e-30  # tiny values, huge iscale
    xq, dx, _ = quantize_activations_q8k(x)
    assert xq[1, 1, 44] == -127 and xq[1, 1, 0] == 0 and xq[1, 1, 1] == 2 and xq[1, 1, 2] == 2
    assert dx[2, 0] < 0 and dx[3, 0] == 0
    y = kquant_linear(x, selection_blocks(k), k, "q2_k", portable=portable)
    assert torch.equal(y, (xq * dx[..., None]).view(rows, k))


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gemv_matches_the_integer_reference(kind, portable):
    k, n = 512, 37
    blocks = torch.from_numpy(random_blocks(kind, n, k, seed=2))
    for m in (1, 2, 3, 4, 6):  # every row tile of the kernel, and more rows than one tile
        x = torch.randn(m, k)
        y = kquant_linear(x, blocks, k, kind, portable=portable)
        want = kquant_linear_reference(x.double(), blocks, k, kind)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert ((y.double() - want).abs() <= 1e-6 * magnitude(x, blocks, kind)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_tiled_gemm_matches_the_integer_reference(kind):
    """Eight rows and more run the tiled int8 GEMM (kgemm.h): tiles of 32 weight rows (a last one of 6 or 13, the
    rest zero) against 6 activation rows at a time (tails of 1-5), fp32 or bf16 x. Each output is the integer math in
    PyTorch within fp32 rounding, the same for bf16 x as for its fp32 copy, and the same on 2 threads as on 1."""
    k = 768
    for n, m in ((70, 8), (45, 13), (32, 27)):
        blocks = torch.from_numpy(random_blocks(kind, n, k, seed=n))
        x = torch.randn(m, k)
        y = kquant_linear(x, blocks, k, kind)
        want = kquant_linear_reference(x.double(), blocks, k, kind)
        assert ((y.double() - want).abs() <= 1e-6 * magnitude(x, blocks, kind)).all()
        xb = x.bfloat16()
        assert torch.equal(kquant_linear(xb, blocks, k, kind), kquant_linear(xb.float(), blocks, k, kind).bfloat16())
        torch.set_num_threads(2)
        try:
            assert torch.equal(kquant_linear(x, blocks, k, kind), y)
        finally:
            torch.set_num_threads(1)


@pytest.mark.parametrize("kind", KINDS)
def test_one_row_gemv_tiles_weight_rows_bit_for_bit(kind):
    """Decode's one activation row runs a kernel of its own (weight rows 4 at a time, a tail of 1-3): each output
    is bit for bit what the multi-row kernel gives that row, on every tile and tail length."""
    k = 768
    for n in (1, 3, 4, 9, 38):
        blocks = torch.from_numpy(random_blocks(kind, n, k, seed=n))
        x = torch.randn(2, k)
        assert torch.equal(kquant_linear(x[:1], blocks, k, kind), kquant_linear(x, blocks, k, kind)[:1])


@pytest.mark.parametrize("kind", KINDS)
def test_gemv_is_within_the_activation_rounding_of_fp32(kind):
    """Against fp32 x times gguf's own dequantization: each x moves by at most half its block's step |d_x| / 2."""
    k, n = 768, 29
    blocks = random_blocks(kind, n, k, seed=3, scale=1e-3)
    w = reference_weight(blocks, kind, k).double()
    x = torch.randn(3, k) * torch.logspace(-2, 2, k)  # blocks of very different ranges
    y = kquant_linear(x, torch.from_numpy(blocks), k, kind).double()
    _, dx, _ = quantize_activations_q8k(x)
    step = dx.abs().double().repeat_interleave(256, -1)
    bound = 0.5 * step @ w.abs().T + 1e-5 * x.abs().double() @ w.abs().T
    err = (y - x.double() @ w.T).abs()
    assert (err <= bound).all()
    assert err.max() > 0.01 * bound.max()  # the bound is not vacuous


def test_bf16_activations_and_shape_errors():
    k = 256
    blocks = torch.from_numpy(random_blocks("q4_k", 8, k, scale=1e-3))
    x = torch.randn(2, 3, k, dtype=torch.bfloat16)
    y = kquant_linear(x, blocks, k, "q4_k")
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 8)
    torch.testing.assert_close(y, kquant_linear_reference(x.float(), blocks, k, "q4_k").bfloat16())
    with pytest.raises(BlockFormatError, match="multiple of 256"):
        kquant_linear(torch.randn(1, 128), blocks[:, :72], 128, "q4_k")
    with pytest.raises(BlockFormatError, match="features"):
        kquant_linear(torch.randn(1, 512), blocks, k, "q4_k")
    with pytest.raises(BlockFormatError, match=r"\(N, K / 256 \* 210\)"):
        kquant_dequantize(blocks, k, "q6_k")


def test_without_the_native_build_the_pytorch_paths_run(monkeypatch):
    k = 512
    blocks = torch.from_numpy(random_blocks("q6_k", 5, k, scale=1e-3))
    x = torch.randn(2, k)
    native = kquant_linear(x, blocks, k, "q6_k")
    monkeypatch.setattr(ggml_blocks, "_kext", lambda: None)
    torch.testing.assert_close(kquant_linear(x, blocks, k, "q6_k"), native, rtol=1e-5, atol=1e-5)
    assert torch.equal(kquant_dequantize(blocks, k, "q6_k"), reference_weight(blocks.numpy(), "q6_k", k))


@pytest.mark.parametrize("kind", ["q4_k", "q6_k"])
def test_quantized_linear_runs_gemv_for_decode_and_chooses_the_prefill_gemm(kind):
    k, n = 512, 48
    blocks = random_blocks(kind, n, k, seed=4, scale=1e-3)
    qt = QuantizedTensor(WeightFormat.gguf(kind), (n, k), {"blocks": torch.from_numpy(blocks)})
    bias = torch.randn(n)
    layer = QuantizedLinear.from_quantized(qt, bias)
    layer.prepare()
    assert layer.lut is None  # nothing repacked: decode reads the blocks as stored
    w = reference_weight(blocks, kind, k)
    x = torch.randn(1, k)
    assert qmatmul.kernel_for(qt, 1, None) == ("vnni" if vnni_available() else "dequant")
    torch.testing.assert_close(layer(x), kquant_linear(x, qt.data["blocks"], k, kind) + bias)
    xs = torch.randn(100, k)
    assert qmatmul.kernel_for(qt, 100, None) == "dequant"  # fp32 prefill: exact
    torch.testing.assert_close(layer(xs), F.linear(xs, w, bias), rtol=1e-5, atol=1e-5)
    tiled = qmatmul.tiled_gemm(kind)  # bf16 prefill: the tiled int8 GEMM where it pays
    assert qmatmul.kernel_for(qt, 100, None, torch.bfloat16) == ("vnni" if tiled else "dequant")
    xb = xs.bfloat16()
    if tiled:  # bit for bit the kernel's output (tested above) plus the bias
        assert torch.equal(layer(xb), (kquant_linear(xb, qt.data["blocks"], k, kind).float() + bias).bfloat16())
    else:
        torch.testing.assert_close(layer(xb), F.linear(xb.float(), w, bias).bfloat16())

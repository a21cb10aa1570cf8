"""Weight formats against independent references: gguf's quantizers for the llama.cpp layouts, NumPy for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from edgellm.errors import EdgeLLMError
from edgellm.kernels.native import cpu_has_native_bf16
from edgellm.quant import QuantFormatError, QuantizedLinear, WeightFormat, qmatmul, quantize, quantize_model
from edgellm.quant.formats import pack_codes, unpack_codes

GGUF_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
              "mxfp4": GGMLQuantizationType.MXFP4}
AFFINE = ["int4-g32", "int4-g64", "int4-g128", "int3-g64", "int3-g128", "int2-g32", "int2-g64"]


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, an all-zero block, exact ties and values on rounding midpoints."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 1, n).unsqueeze(1)
    w[0, :32] = 0
    w[1, :32] = torch.arange(32) - 16.0  # ties for the largest magnitude, midpoints for q8_0/q4_0
    w[2, :32] = torch.tensor([0.5, -0.5, 1.5, -2.5] * 8) * 3.0
    return w


def summation_tolerance(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """How far two fp32 F.linear(x, w, bias) may differ when only the summation order differs (BLAS picks its
    kernel, and so its order, by shape and CPU: MKL on Zen 4 differs between one call and row chunks)."""
    # any order is within γ_{K+1}·(|x|·|w|ᵀ+|b|) of the exact value (Higham, Thm 3.1): 2γ_{K+1} ≤ (K+2)·eps32, K < 4000
    return (x.shape[-1] + 2) * torch.finfo(torch.float32).eps * F.linear(x.abs(), w.abs(), bias.abs())


def bit_stream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Reference packing: code k of a row occupies bits k*b .. k*b+b-1 of the row's little-endian bit stream."""
    n, k = codes.shape
    stream = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits].reshape(n, k * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_block_formats_are_byte_identical_to_gguf(name):
    w = weights(48, 256)
    qt = quantize(w, name)
    ref = gguf_quantize(w.numpy(), GGUF_TYPES[name])
    assert qt.data["blocks"].dtype == torch.uint8 and qt.data["blocks"].shape == ref.shape
    assert np.array_equal(qt.data["blocks"].numpy(), ref)
    assert np.array_equal(qt.dequantize().numpy(), gguf_dequantize(ref, GGUF_TYPES[name]))


def test_q4_0_codes_follow_the_llama_cpp_nibble_order():
    w = weights(8, 64, seed=1)
    qt = quantize(w, "q4_0")
    raw = gguf_quantize(w.numpy(), GGMLQuantizationType.Q4_0).reshape(8, 2, 18)
    d = raw[..., :2].copy().view(np.float16).astype(np.float32)
    nibbles = np.concatenate([raw[..., 2:] & 0x0F, raw[..., 2:] >> 4], axis=-1).reshape(8, 64)  # 0..15, then 16..31
    u = qt.unpacked_codes()
    assert np.array_equal(u.codes.numpy(), nibbles)
    assert np.array_equal(u.scales.numpy(), d[..., 0]) and np.array_equal(u.biases.numpy(), -8 * d[..., 0])
    assert u.bits == 4 and u.group == 32


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_block_formats_need_whole_blocks(name):
    with pytest.raises(QuantFormatError, match="multiple of 32"):
        quantize(torch.randn(4, 48), name)


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("k", [256, 200])
def test_affine_matches_numpy_reference(name, k):
    fmt = WeightFormat.parse(name)
    w = weights(16, k, seed=2)
    qt = quantize(w, name)
    kp, qmax = fmt.padded(k), 2**fmt.bits - 1
    padded = np.full((16, kp), np.nan, dtype=np.float32)
    padded[:, :k] = w.numpy()
    groups = padded.reshape(16, kp // fmt.group, fmt.group)
    lo, hi = np.nanmin(groups, -1), np.nanmax(groups, -1)
    scale, bias = ((hi - lo) / np.float32(qmax)).astype(np.float16), lo.astype(np.float16)
    s, b = scale.astype(np.float32)[..., None], bias.astype(np.float32)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.clip(np.where(s > 0, np.round((groups - b) / s), 0), 0, qmax).reshape(16, kp)[:, :k]
    assert np.array_equal(qt.data["scales"].numpy(), scale) and np.array_equal(qt.data["biases"].numpy(), bias)
    u = qt.unpacked_codes()
    assert u.codes.shape == (16, kp) and np.array_equal(u.codes[:, :k].numpy(), q.astype(np.uint8))
    assert np.array_equal(qt.data["codes"].numpy(), bit_stream_pack(u.codes.numpy(), fmt.bits))
    dq = qt.dequantize()
    assert dq.shape == (16, k)
    step = np.repeat(scale.astype(np.float32), fmt.group, axis=1)[:, :k]
    err = np.abs(w.numpy() - dq.numpy())
    assert (err <= step / 2 + 1e-3 * np.abs(w.numpy()) + 1e-6).all()


@pytest.mark.parametrize("k", [256, 200])
@pytest.mark.parametrize("name", ["ternary", "ternary-g128"])
def test_ternary_matches_numpy_reference(name, k):
    fmt = WeightFormat.parse(name)
    w = weights(16, k, seed=3)
    qt = quantize(w, name)
    kp = fmt.padded(k)
    padded = np.full((16, kp), np.nan, dtype=np.float32)
    padded[:, :k] = w.numpy()
    groups = padded.reshape(16, kp // fmt.group, fmt.group)
    absmean = np.nanmean(np.abs(groups), -1)
    stored = qt.data["scales"].numpy()
    assert np.allclose(stored.astype(np.float32), absmean, rtol=1e-3)  # fp16 rounding of the mean (any sum order)
    assert np.array_equal(qt.data["biases"].numpy(), -stored)
    s = stored.astype(np.float32)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(s > 0, np.round(np.clip(groups / s, -1, 1)), 0).reshape(16, kp)[:, :k]
    u = qt.unpacked_codes()
    assert np.array_equal(u.codes[:, :k].numpy().astype(np.int64) - 1, q)
    assert np.array_equal(qt.data["codes"].numpy(), bit_stream_pack(u.codes.numpy(), 2))
    step = np.repeat(qt.data["scales"].float().numpy(), fmt.group, axis=1)[:, :k]
    assert np.array_equal(qt.dequantize().numpy(), step * (u.codes[:, :k].numpy().astype(np.float32) - 1))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert np.array_equal(packed.numpy(), bit_stream_pack(codes.numpy(), bits))
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_parse_names_and_bits():
    expect = {"q8_0": 8.5, "q4_0": 4.5, "mxfp4": 4.25, "int4-g64": 4.5, "int4-g32": 5.0, "int3-g128": 3.25,
              "int2-g64": 2.5, "ternary": 2.5, "ternary-g128": 2.25}
    for name, bpw in expect.items():
        fmt = WeightFormat.parse(name.upper())
        assert fmt.name == name and fmt.bits_per_weight == bpw
    assert WeightFormat.parse("ternary-g64") == WeightFormat.parse("ternary")
    for bad in ["q5_k", "int4", "int4-g48", "int8-g64", ""]:
        with pytest.raises(QuantFormatError, match=r"q4_0.*int3-g128") as info:
            WeightFormat.parse(bad)
        assert isinstance(info.value, EdgeLLMError)


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "int3-g64", "mxfp4", "ternary"])
@pytest.mark.parametrize("rows", [1, 32])
def test_quantized_linear_matches_f_linear_on_dequantized_weight(name, rows, monkeypatch):
    g = torch.Generator().manual_seed(rows)  # seeded: the 0.1% scale bug below must move some output past the bound
    w, bias = weights(96, 128, seed=4), torch.randn(96, generator=g)
    layer = QuantizedLinear.from_quantized(quantize(w, name), bias)
    x = torch.randn(2, rows, 128, generator=g)
    ref = F.linear(x, layer.quantized.dequantize(), bias)
    # the decode kernels (LUT / VNNI) round activations or their tables to int8: within 2% of the output's scale
    assert (layer(x) - ref).abs().max() <= 0.02 * ref.abs().max()
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")  # the same weights, other sum orders
    w_exact = layer.quantized.dequantize()
    tol = summation_tolerance(x, w_exact, bias)
    assert ((layer(x) - ref).abs() <= tol).all()
    monkeypatch.setattr(qmatmul, "DEQUANT_CHUNK_ELEMENTS", 128 * 10)  # row chunks, last one partial
    assert ((layer(x) - ref).abs() <= tol).all()
    w_bug = w_exact.clone()
    w_bug[50, :32] *= 1.001  # a scale 0.1% off in one block still fails the bound (by ~40x)
    assert ((F.linear(x, w_bug, bias) - ref).abs() > tol).any()
    out = layer(x.bfloat16())  # the result rounded to bf16 (relative error <= 2**-8), and where the CPU computes
    x16 = x.bfloat16().float()  # bf16 natively, the weights too: the GEMM runs in bf16 (each weight within 2**-8)
    ref16, tol16 = F.linear(x16, w_exact, bias), summation_tolerance(x16, w_exact, bias)
    weight_error = 2**-8 * (x16.abs() @ w_exact.abs().T) if cpu_has_native_bf16() else 0.0
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref16).abs() <= 2**-8 * (ref16.abs() + tol16) + tol16 + weight_error).all()
    stored = ["bias", "blocks"] if name in GGUF_TYPES else ["bias", "biases", "codes", "scales"]
    assert sorted(layer.state_dict()) == stored


def test_quantize_model_keeps_hf_names_and_leaves_embeddings(llama_dir):
    from edgellm import load
    model, _ = load(llama_dir, "fp32")
    tokens = torch.tensor([[0, 5, 9, 33, 2]])
    ref = model(tokens)
    names = quantize_model(model, "q8_0", skip=["*.down_proj"])
    assert len(names) == 2 * 6 and not any(n.endswith("down_proj") for n in names)
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.blocks" in sd and "model.layers.0.mlp.down_proj.weight" in sd
    assert sd["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" in sd
    out = model(tokens)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("name", ["int4-g64", "int2-g64"])
def test_mse_clipping_lowers_weight_error(name):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    rtn, mse = quantize(w, name), quantize(w, name, method="mse")
    err_rtn, err_mse = (w - rtn.dequantize()).square(), (w - mse.dequantize()).square()
    group = WeightFormat.parse(name).group
    groups_mse, groups_rtn = err_mse.view(64, -1, group).sum(-1), err_rtn.view(64, -1, group).sum(-1)
    assert (groups_mse <= groups_rtn * (1 + 1e-6)).all()  # the search keeps rtn where it is best
    assert err_mse.sum() < 0.95 * err_rtn.sum()
    with pytest.raises(QuantFormatError, match="use rtn"):
        quantize(w, "q4_0", method="mse")


@pytest.mark.parametrize("fmt", ["int2-g64", "int3-g128", "int4-g32", "int4-g64", "ternary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_codes_dequantize_matches_the_pytorch_path(fmt, dtype, monkeypatch):
    """Prefill's native dequantization of intN/ternary codes equals the PyTorch one bit for bit (product and sum
    rounded apart), with K not a multiple of the group (a padded last group), row views and a reused buffer."""
    from edgellm.quant import formats

    k, n = 200, 13
    qt = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(5)), fmt)
    buf = torch.full((8 * k,), float("nan"), dtype=dtype)
    native = [qt.dequantize(dtype), qt.rows(4, 12).dequantize(dtype, buf.view(8, k))]
    if formats.codes_dequantize(qt.data["codes"], qt.data["scales"], qt.data["biases"], k, qt.fmt.bits,
                                qt.fmt.group, dtype) is None:
        pytest.skip("native kernels not built")
    assert native[1].data_ptr() == buf.data_ptr()
    monkeypatch.setattr(formats, "codes_dequantize", lambda *args: None)
    want = qt.dequantize(dtype)
    assert torch.equal(native[0].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.equal(native[1], want[4:12])

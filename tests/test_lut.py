"""Low-bit kernels against independent references: the table-lookup GEMV against dequantize + matmul (within the
bound its int8 tables imply), its native and PyTorch paths against each other, and the Q8_0/Q4_0 kernels against
the `gguf` package's own quantizers and dequantizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from edgellm.kernels import ggml_blocks
from edgellm.kernels.ggml_blocks import (
    BlockFormatError,
    blocks_linear_reference,
    dequant_blocks_linear,
    mxfp4_linear,
    q4_0_linear,
    q4_0_lut_weight,
    q8_0_linear,
)
from edgellm.kernels.lut import (
    LutFormatError,
    LutWeight,
    dequant_linear,
    dequantize,
    lut_error_bound,
    lut_linear,
    lut_linear_reference,
)

SHAPES = [(1000, 64, 100), (4096, 128, 64), (96, 32, 33), (160, 64, 130), (1000, 128, 7)]  # (K, group, N)


def make(bits: int, k: int, group: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    groups = -(-k // group)
    scales = torch.rand(n, groups, generator=g) * 0.1 + 0.01
    biases = torch.randn(n, groups, generator=g) * 0.05 - scales * (2**bits - 1) / 2  # roughly zero-mean weights
    return codes, scales.half().float(), biases.half().float()  # fp16 values, as every stored format holds


def exact(x: torch.Tensor, codes, scales, biases, group: int) -> torch.Tensor:
    return x.double() @ dequantize(codes, scales, biases, group, torch.float64).T


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("k", "group", "n"), SHAPES)
@pytest.mark.parametrize("m", [1, 3, 32])  # 3: pairs of rows and a single one
def test_lut_within_table_quantization_bound(bits, k, group, n, m):
    codes, scales, biases = make(bits, k, group, n)
    w = LutWeight.prepare(codes, scales, biases, bits, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    y = lut_linear(x, w)
    ref = exact(x, codes, scales, biases, group)
    err = (y.double() - ref).abs()
    # the int8 tables' worst case, plus fp32 rounding of sums over K terms
    bound = lut_error_bound(x, scales, bits, group).double() + 1e-5 * ref.abs().max()
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() <= 2e-2 * ref.abs().max()  # typical: rounding errors cancel, ~0.5% of the output scale
    # the native kernel and the PyTorch path do the same integer math
    torch.testing.assert_close(y, lut_linear_reference(x, w), rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_lut_bf16_and_leading_dims():
    codes, scales, biases = make(3, 256, 64, 48)
    w = LutWeight.prepare(codes, scales, biases, 3, 64)
    x = torch.randn(2, 3, 256)
    y32 = lut_linear(x, w)
    assert y32.shape == (2, 3, 48)
    torch.testing.assert_close(y32.view(6, 48), lut_linear(x.view(6, 256), w))
    y16 = lut_linear(x.bfloat16(), w)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), lut_linear(x.bfloat16().float(), w), rtol=2**-7, atol=1e-2)


def test_lut_takes_q4_0_blocks_from_gguf():
    """q4_0 maps to bits=4, codes = nibbles, scale = d, bias = -8d, group 32."""
    rng = np.random.default_rng(0)
    blocks = gguf.quants.quantize(rng.standard_normal((40, 256)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    wd = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)).double()
    w = q4_0_lut_weight(torch.from_numpy(blocks), 256)
    x = torch.randn(1, 256)
    ref = x.double() @ wd.T
    err = (lut_linear(x, w).double() - ref).abs()
    d = torch.from_numpy(blocks.reshape(40, 8, 18)[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert (err <= lut_error_bound(x, d, 4, 32).double() + 1e-5 * ref.abs().max()).all()


def test_lut_stores_fp16_scales_and_biases():
    """fp32 scales and biases are rounded to the nearest fp16 once, at prepare: the kernel then computes with exactly
    those values, so its output equals that of the same weight given in fp16."""
    codes, scales, biases = make(3, 256, 32, 70)
    s32 = scales * (1 + torch.rand(scales.shape) * 1e-3)  # off the fp16 grid
    b32 = biases * (1 + torch.rand(biases.shape) * 1e-3)
    w = LutWeight.prepare(codes, s32, b32, 3, 32)
    assert w.scale.dtype == w.bias.dtype == torch.float16
    # 3 bits a weight + 2 x 16 bits per group of 32 = 4 bits a weight, for 128 padded rows
    assert w.nbytes() == 128 * 256 * 4 // 8
    x = torch.randn(3, 256)
    rounded = LutWeight.prepare(codes, s32.half(), b32.half(), 3, 32)
    assert torch.equal(lut_linear(x, w), lut_linear(x, rounded))
    torch.testing.assert_close(lut_linear(x, w), lut_linear_reference(x, w), rtol=1e-5, atol=1e-5)
    ref = exact(x, codes, s32.half().float(), b32.half().float(), 32)
    assert ((lut_linear(x, w).double() - ref).abs() <= lut_error_bound(x, s32, 3, 32) + 1e-5 * ref.abs().max()).all()


def test_dequant_linear_is_exact():
    codes, scales, biases = make(2, 1000, 64, 300)  # 300 rows: two dequantized chunks
    x = torch.randn(2, 1000)
    torch.testing.assert_close(dequant_linear(x, codes, scales, biases, 64).double(),
                               exact(x, codes, scales, biases, 64), rtol=1e-5, atol=1e-4)


def test_lut_rejects_bad_formats():
    codes, scales, biases = make(2, 128, 64, 8)
    with pytest.raises(LutFormatError, match="bits"):
        LutWeight.prepare(codes, scales, biases, 5, 64)
    with pytest.raises(LutFormatError, match="group"):
        LutWeight.prepare(codes, scales, biases, 2, 48)
    with pytest.raises(LutFormatError, match="below"):
        LutWeight.prepare(codes | 4, scales, biases, 2, 64)
    with pytest.raises(LutFormatError, match="scales"):
        LutWeight.prepare(codes, scales[:, :1], biases, 2, 64)
    with pytest.raises(LutFormatError, match="fp16"):
        LutWeight.prepare(codes, scales, biases * 1e6, 2, 64)
    with pytest.raises(LutFormatError, match="features"):
        lut_linear(torch.randn(1, 100), LutWeight.prepare(codes, scales, biases, 2, 64))


def test_no_native_env_runs_the_same_math(tmp_path):
    codes, scales, biases = make(2, 1000, 64, 70)
    x = torch.randn(3, 1000)
    torch.save((codes, scales, biases, x), tmp_path / "in.pt")
    code = ("import sys, torch; from edgellm.kernels import lut, ggml_blocks, softmax;"
            "c, s, b, x = torch.load(sys.argv[1]); assert not lut.lut_available();"
            "assert not ggml_blocks.vnni_available();"
            "torch.save(lut.lut_linear(x, lut.LutWeight.prepare(c, s, b, 2, 64)), sys.argv[2])")
    env = {**os.environ, "EDGELLM_NO_NATIVE": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env,
                   check=True, timeout=300)
    fallback = torch.load(tmp_path / "out.pt")
    y = lut_linear(x, LutWeight.prepare(codes, scales, biases, 2, 64))
    torch.testing.assert_close(y, fallback, rtol=1e-5, atol=1e-5 * y.abs().max().item())  # same tables and sums


KINDS = {"q8_0": (gguf.GGMLQuantizationType.Q8_0, q8_0_linear), "q4_0": (gguf.GGMLQuantizationType.Q4_0, q4_0_linear),
         "mxfp4": (gguf.GGMLQuantizationType.MXFP4, mxfp4_linear)}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize(("k", "n"), [(32, 7), (96, 33), (160, 100), (4096, 64)])  # odd block counts: tails
@pytest.mark.parametrize("m", [1, 5])
def test_gguf_blocks_match_gguf_dequantize(kind, k, n, m):
    qtype, op = KINDS[kind]
    rng = np.random.default_rng(k + n)
    blocks = torch.from_numpy(gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype))
    wd = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype)).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    y = op(x, blocks, k)
    ref = x.double() @ wd.T
    # x is rounded per 32-block to a step of amax / 127: each element is off by at most half a step
    step = x.view(m, -1, 32).abs().amax(-1).double() / 127
    bound = (step.repeat_interleave(32, dim=1) / 2) @ wd.abs().T + 1e-5 * ref.abs().max()
    assert y.shape == (m, n)
    assert ((y.double() - ref).abs() <= bound).all()
    torch.testing.assert_close(y, blocks_linear_reference(x, blocks, k, kind), rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(dequant_blocks_linear(x, blocks, k, kind).double(), ref, rtol=1e-5, atol=1e-4)


def test_gguf_blocks_reject_bad_shapes():
    with pytest.raises(BlockFormatError, match="multiple of 32"):
        q8_0_linear(torch.randn(1, 40), torch.zeros(2, 68, dtype=torch.uint8), 40)
    with pytest.raises(BlockFormatError, match="blocks must be"):
        q4_0_linear(torch.randn(1, 64), torch.zeros(2, 68, dtype=torch.uint8), 64)


def test_choose_kernel_follows_the_measured_table(monkeypatch):
    from edgellm.kernels import select

    monkeypatch.setattr(select, "_table", lambda: {"lut_max_rows": {"2": 16}, "vnni_max_rows": 4})
    monkeypatch.setattr(select, "lut_available", lambda: True)
    monkeypatch.setattr(select, "vnni_available", lambda: True)
    assert select.choose_kernel(2, 2048, 2048, 16) == "lut"
    assert select.choose_kernel(2, 2048, 2048, 17) == "dequant"
    assert select.choose_kernel(3, 2048, 2048, 32) == "lut"  # no entry: the default row limit
    assert select.choose_kernel(8, 2048, 2048, 4) == "vnni"
    assert select.choose_kernel(8, 2048, 2050, 1) == "dequant"  # Q8_0 needs whole blocks
    assert select.choose_kernel(6, 2048, 2048, 1) == "dequant"
    monkeypatch.setattr(select, "lut_available", lambda: False)
    assert select.choose_kernel(2, 2048, 2048, 1) == "dequant"


def test_mxfp4_decodes_on_its_blocks():
    from edgellm.quant.formats import quantize
    from edgellm.quant.qmatmul import kernel_for, prepare_lut, quantized_linear

    qt = quantize(torch.randn(48, 96, generator=torch.Generator().manual_seed(1)), "mxfp4")
    x = torch.randn(2, 96)
    if ggml_blocks.vnni_available():
        assert prepare_lut(qt) is None and kernel_for(qt, 2, None) == "vnni" and kernel_for(qt, 4096, None) == "dequant"
    torch.testing.assert_close(quantized_linear(x, qt), blocks_linear_reference(x, qt.data["blocks"], 96, "mxfp4"))


def test_crossover_table_takes_the_worst_shape():
    from edgellm.kernels.select import crossover_table

    lowbit = [dict(bits=2, rows=m, lut_vs_dequant=r) for m, r in [(1, 9.0), (8, 3.0), (32, 0.9)]]
    lowbit += [dict(bits=2, rows=8, lut_vs_dequant=0.8), dict(bits=4, rows=1, lut_vs_dequant=2.0)]
    ggml = [dict(rows=1, q8_0_vs_dequant=5.0), dict(rows=8, q8_0_vs_dequant=1.5)]
    assert crossover_table({"lowbit": lowbit, "ggml": ggml}) == {
        "lut_max_rows": {"1": 1, "2": 1, "4": 1}, "vnni_max_rows": 8}


def test_bench_kernels_reports_every_section(tmp_path):
    from edgellm.cli import main

    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--shapes", "default.gate_up", "--bits", "2", "--rows", "1", "--vocab", "100",
                 "--reps", "1", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["threads"] == 1 and len(run["lowbit"]) == len(run["ggml"]) == len(run["softmax"]) == 1
    assert run["lowbit"][0]["lut_vs_dequant"] > 0 and run["softmax"][0]["vocab"] == 100

"""The native per-token decode ops (one-query attention, RMS norm) against the PyTorch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgellm import generate, load
from edgellm.kernels import decode
from edgellm.kv import DenseKVCache


@pytest.fixture(scope="module")
def ext():
    module = decode._ext()
    if module is None:
        pytest.skip("native kernel unavailable (no compiler or ninja, or EDGELLM_NO_NATIVE=1)")
    return module


# (batch, query heads, kv heads, cached positions, head dim): GQA groups 1-8 and 10, head dims on and off the
# 16-lane fast path (24, 512), whose P.V passes take 8, 4, 2 or 1 16-lane slices of V (80, 96), one position,
# positions not a multiple of 16
SHAPES = [(1, 16, 4, 270, 64), (2, 6, 2, 33, 64), (1, 8, 8, 1, 128), (3, 4, 1, 1000, 32), (1, 4, 2, 17, 24),
          (1, 32, 4, 50, 128), (1, 2, 1, 5, 512), (2, 8, 1, 129, 16), (1, 14, 2, 100, 64), (1, 12, 2, 40, 96),
          (1, 5, 1, 37, 80), (1, 10, 1, 21, 128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_sdpa_on_a_cache_view(ext, shape):
    b, h, hkv, t, d = shape
    g = torch.Generator().manual_seed(t)
    q = 3 * torch.randn(b, h, 1, d, generator=g)
    cache = DenseKVCache(b, hkv, d, t + 20, torch.float32, "cpu")  # the strided views decode really reads
    k, v = cache.update_and_fetch(torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g))
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=h != hkv)
    out = ext.attend_one(q, k, v, d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(decode.decode_attention(q, k, v, d**-0.5), out)


# bf16 and fp16 K/V (the dense KV formats) under a bf16 query: GQA 4x and 1x, head dims 64 and 128 on the
# fast path and 24 off it, odd lengths
BF16_SHAPES = [(1, 16, 4, 2048, 64), (1, 16, 4, 271, 128), (2, 8, 2, 33, 64), (1, 4, 4, 1, 128), (1, 8, 2, 17, 24)]


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_bf16_attention_is_fp32_attention_rounded_once(ext, shape, kv_dtype):
    """fp32 arithmetic on the bf16/fp16 inputs, one rounding to bf16: within half a bf16 ulp of the fp32 result."""
    b, h, hkv, t, d = shape
    g = torch.Generator().manual_seed(t + d)
    q = (3 * torch.randn(b, h, 1, d, generator=g)).bfloat16()
    cache = DenseKVCache(b, hkv, d, t + 20, kv_dtype, "cpu")
    k, v = cache.update_and_fetch(torch.randn(b, hkv, t, d, generator=g).to(kv_dtype),
                                  torch.randn(b, hkv, t, d, generator=g).to(kv_dtype))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=d**-0.5, enable_gqa=h != hkv)
    out = decode.decode_attention(q, k, v, d**-0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ext.attend_one(q, k, v, d**-0.5))
    assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 1e-5).all()


def test_fp32_query_reads_bf16_and_fp16_caches_exactly(ext):
    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 45, 64), torch.randn(1, 2, 45, 64)
    for dtype in (torch.bfloat16, torch.float16):
        kd, vd = k.to(dtype), v.to(dtype)
        out = decode.decode_attention(q, kd, vd, 0.125)
        ref = F.scaled_dot_product_attention(q, kd.float(), vd.float(), scale=0.125, enable_gqa=True)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_falls_back_where_the_kernel_does_not_apply(ext):
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    for args in ((q.half(), k.half(), v.half()), (q.requires_grad_(), k, v)):
        out = decode.decode_attention(*args, 0.2)
        ref = F.scaled_dot_product_attention(*args, scale=0.2, enable_gqa=True)
        assert torch.equal(out, ref) and out.requires_grad == args[0].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 384), (1, 1, 7), (2, 1, 4096), (8, 1000), (4, 1, 64), (5, 5120)])
def test_rms_norm_matches_the_reference(ext, shape, dtype):
    """transformers' norm: fp32 math, cast to x's dtype, then times the weight.

    The native op follows ATen's summation order (bit-identical with torch 2.13 on x86), but that order is ATen's
    implementation detail: allowed is what another order can change, fp32 summation error before the two roundings
    (one bf16 ulp each in bf16)."""
    tol = {"rtol": 2**-7, "atol": 0.0} if dtype == torch.bfloat16 else {"rtol": 4 * shape[-1] * 2**-24, "atol": 0.0}
    for seed in range(4):
        g = torch.Generator().manual_seed(seed * 100_000 + shape[-1])
        x = (10 * torch.randn(shape, generator=g) * torch.rand(shape, generator=g)).to(dtype)
        w = torch.randn(shape[-1], generator=g).to(dtype)
        ref = w * F.rms_norm(x.float(), (shape[-1],), eps=1e-6).to(dtype)
        torch.testing.assert_close(ext.rms_norm(x, w, 1e-6), ref, **tol)
        torch.testing.assert_close(decode.rms_norm(x, w, 1e-6), ref, **tol)


def test_rms_norm_keeps_autograd_and_big_inputs_on_torch(ext):
    x, w = torch.randn(64, 128, requires_grad=True), torch.randn(128)
    decode.rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    big = torch.randn(decode.NORM_MAX_ROWS + 1, 128)
    assert torch.equal(decode.rms_norm(big, w, 1e-5), F.rms_norm(big, (128,), w, 1e-5))


def test_bad_shapes_are_refused(ext):
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ext.attend_one(torch.randn(1, 3, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), 1.0)
    with pytest.raises(RuntimeError, match="one query"):
        ext.attend_one(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), 1.0)
    with pytest.raises(RuntimeError, match="last dimension"):
        ext.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)


class CountingExt:
    """The native extension, counting the calls that reach it."""

    def __init__(self, module) -> None:
        self.module, self.calls = module, 0

    def __getattr__(self, name: str):
        self.calls += 1
        return getattr(self.module, name)


def test_bf16_greedy_decode_matches_the_pytorch_path(ext, checkpoint, monkeypatch):
    model, tokenizer = load(checkpoint("llama", num_attention_heads=8, num_key_value_heads=2), "bf16")
    prompt = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    counting = CountingExt(ext)
    monkeypatch.setattr(decode, "_ext", lambda: counting)
    native = generate(model, tokenizer, prompt, max_tokens=12).tokens
    assert counting.calls > 0
    monkeypatch.setattr(decode, "_ext", lambda: None)
    assert native == generate(model, tokenizer, prompt, max_tokens=12).tokens

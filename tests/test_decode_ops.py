"""The native per-token decode ops (one-query attention, RMS norm) against the PyTorch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgellm.kernels import decode
from edgellm.kv import DenseKVCache


@pytest.fixture(scope="module")
def ext():
    module = decode._ext()
    if module is None:
        pytest.skip("native kernel unavailable (no compiler or ninja, or EDGELLM_NO_NATIVE=1)")
    return module


# (batch, query heads, kv heads, cached positions, head dim): GQA groups 1-8, head dims on and off the
# 16-lane fast path (24, 512), one position, positions not a multiple of 16
SHAPES = [(1, 16, 4, 270, 64), (2, 6, 2, 33, 64), (1, 8, 8, 1, 128), (3, 4, 1, 1000, 32), (1, 4, 2, 17, 24),
          (1, 32, 4, 50, 128), (1, 2, 1, 5, 512), (2, 8, 1, 129, 16)]


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


def test_attention_falls_back_where_the_kernel_does_not_apply(ext):
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    for args in ((q.bfloat16(), k.bfloat16(), v.bfloat16()), (q.requires_grad_(), k, v)):
        out = decode.decode_attention(*args, 0.2)
        ref = F.scaled_dot_product_attention(*args, scale=0.2, enable_gqa=True)
        assert torch.equal(out, ref) and out.requires_grad == args[0].requires_grad


@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 384), (1, 1, 7), (2, 1, 4096)])
def test_rms_norm_matches_torch(ext, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x, w = 10 * torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
    ref = F.rms_norm(x, (shape[-1],), w, 1e-6)
    torch.testing.assert_close(ext.rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode.rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-5)


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

"""The small per-token ops of a decode step (one-query attention over a contiguous or a paged cache, RMS norm) as
native loops, fp32 or bf16.

Both compute in fp32 and return the input's dtype. Each falls back to the PyTorch op it replaces (the reference)
when the native build is missing, the dtypes are not covered, the shapes are not a decode step's, or autograd
needs a backward.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from edgellm.kernels.native import load_extension

NORM_MAX_ROWS = 8  # past a few rows ATen's parallel rms_norm is the faster one
NORM_MAX_DIM = 32767  # ATen splits the sum of one longer row across threads: another order, other bits
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # of q and of the norm's input
NATIVE_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # dense KV formats: fp32, bf16, fp16


@cache
def _ext() -> Any:
    return load_extension("decode")


def decode_ops_available() -> bool:
    """True when the native decode ops built and loaded (the first call builds or loads them: ~seconds)."""
    return _ext() is not None


def _grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T · scale) v for q (B, H, 1, D) over every cached position of k, v (B, Hkv, T, D), GQA allowed.

    Returned in q's dtype. The native op reads K/V in their own dtype (no `.to` copy of the whole cache) and
    accumulates in fp32, so on bf16 it is at least as accurate as SDPA's bf16 path, not bit-identical to it.
    """
    if (q.dtype in NATIVE_DTYPES and k.dtype == v.dtype and k.dtype in NATIVE_KV_DTYPES and q.is_cpu
            and q.shape[2] == 1 and q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1
            and not _grad(q, k, v) and _ext() is not None):
        return _ext().attend_one(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                           tokens: int, scale: float) -> torch.Tensor | None:
    """decode_attention for q (1, H, 1, D) over the first `tokens` positions of a paged cache: the block pool's K/V
    fields (blocks, Hkv, block_tokens, D), token i in block table[i // block_tokens] (int64), read in place.

    None where the native op does not apply; the caller runs its PyTorch path (pool.py's blockwise attention).
    """
    if (q.dtype in NATIVE_DTYPES and keys.dtype == values.dtype and keys.dtype in NATIVE_KV_DTYPES and q.is_cpu
            and keys.is_cpu and q.shape[0] == 1 and q.shape[2] == 1 and q.stride(3) == 1 and not _grad(q)
            and _ext() is not None):
        return _ext().attend_paged(q, keys, values, table, tokens, scale)
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dimension, as transformers computes it (exact parity).

    The norm runs in fp32 and is cast back to x's dtype before the weight scales it; the native op, for x and
    weight both fp32 or both bf16, is bit-identical to that.
    """
    if (x.dtype == weight.dtype and x.dtype in NATIVE_DTYPES and x.is_cpu and x.is_contiguous()
            and x.numel() <= NORM_MAX_ROWS * x.shape[-1] and x.shape[-1] <= NORM_MAX_DIM and not _grad(x, weight)
            and _ext() is not None):
        return _ext().rms_norm(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one op; the same bits as the general form below
    return weight * F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps).to(x.dtype)

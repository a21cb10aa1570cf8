"""Attention of a few queries straight over a packed low-bit KV cache (codes plus fp16 scales/zeros), natively.

A decode step over a quantized cache otherwise dequantizes it block by block to fp32 in PyTorch
(`edgellm.kv.quantized_cache.blockwise_attention`, the reference). `packed_attention` returns None whenever the
native op does not apply (no build, autograd, another device, too many query rows), and the caller then runs that
PyTorch path: this module only knows the packed layout, not the caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from edgellm.kernels.native import load_extension

NATIVE_MAX_ROWS = 64  # query rows per KV head; past this, dequantized blocks through a GEMM are the faster way


@dataclass(frozen=True)
class PackedKV:
    """K or V as a quantized cache holds them: uint8 codes and fp16 scales/zeros, each (pages, kv_heads, rows, w).

    Per-token layout: one row per token, one scale per `group` elements of head_dim. Per-channel layout (KIVI
    keys): 8/bits tokens per byte row, one scale row per `group` tokens, held in a single page.
    """

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int
    per_channel: bool = False


@cache
def _ext() -> Any:
    return load_extension("kvattn")


def kvattn_available() -> bool:
    """True when the native op built and loaded (the first call builds or loads it: ~seconds)."""
    return _ext() is not None


def packed_attention(q: torch.Tensor, keys: PackedKV, values: PackedKV, bits: int, table: torch.Tensor,
                     page_tokens: int, tokens: int, recent_keys: torch.Tensor, recent_values: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """softmax(q·Kᵀ·scale)·V and its log-sum-exp, both fp32, over `tokens` packed tokens then the recent ones.

    q is (B, kv_heads, rows, D) fp32, the rows of each KV head (its GQA query heads × positions), already
    rotated when the keys were stored Hadamard-rotated; no mask: every row sees every token. Token i of batch
    row b lives in page `table[b, i // page_tokens]`; `recent_keys`/`recent_values` (B, kv_heads, n, D) follow
    the packed tokens in full precision. Returns (out (B, kv_heads, rows, D), lse (B, kv_heads, rows)), or None
    when the native op does not apply.
    """
    if (q.shape[2] > NATIVE_MAX_ROWS or not q.is_cpu or (torch.is_grad_enabled() and q.requires_grad)
            or _ext() is None):
        return None
    return tuple(_ext().attend_packed(q.float().contiguous(), keys.data, keys.scales, keys.zeros, values.data,
                                      values.scales, values.zeros, table, page_tokens, tokens, bits, keys.group,
                                      values.group, keys.per_channel, recent_keys.float().contiguous(),
                                      recent_values.float().contiguous(), scale))

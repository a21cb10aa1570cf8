"""Attention of a few queries straight over a packed low-bit KV cache (codes plus fp16 scales/zeros), natively,
and the quantize-on-store and Hadamard rotation that fill such a cache.

A decode step over a quantized cache otherwise dequantizes it block by block to fp32 in PyTorch
(`edgellm.kv.quantized_cache.blockwise_attention`, the reference). `packed_attention` returns None whenever the
native op does not apply (no build, autograd, another device, too many query rows), and the caller then runs that
PyTorch path: this module only knows the packed layout, not the caches.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from functools import cache
from typing import Any, BinaryIO

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


@cache
def _codec() -> Any:
    return load_extension("kvcodec")


def _native_input(x: torch.Tensor) -> bool:
    return x.is_cpu and not (torch.is_grad_enabled() and x.requires_grad) and _codec() is not None


def quantize_packed(x: torch.Tensor, bits: int, group: int, channel_groups: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(codes, fp16 scales, fp16 zeros) of `x` quantized in groups along its last dim, or along its second-to-last
    with `channel_groups`, bit-exact with `edgellm.kv.codec.quantize_reference`; None where the op does not apply."""
    if not _native_input(x) or x.dim() < 2:
        return None
    return tuple(_codec().quantize_packed(x.float().contiguous(), bits, group, channel_groups))


def quantize_into(x: torch.Tensor, bits: int, group: int, data: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor) -> bool:
    """Quantize `x` (B, H, n, D) in groups along head_dim straight into a cache's (B, H, n, width) views, as
    `quantize_packed` would; False (nothing written) where the op does not apply."""
    if not _native_input(x) or x.dim() != 4:
        return False
    _codec().quantize_into(x.float().contiguous(), data, scales, zeros, bits, group)
    return True


def hadamard_rows(x: torch.Tensor, scale: float) -> torch.Tensor | None:
    """fp32 Walsh-Hadamard butterfly of every last-dim row of `x`, times `scale`; None where the op does not apply."""
    if not _native_input(x):
        return None
    return _codec().hadamard_rows(x.float().contiguous(), scale)


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


def runs(view: torch.Tensor) -> list[torch.Tensor]:
    """The contiguous pieces of a strided view in C order, each flattened (one piece when it is contiguous)."""
    if view.is_contiguous():
        return [view.reshape(-1)]
    return [piece for sub in view.unbind(0) for piece in runs(sub)]


def read_into(f: BinaryIO, views: list[torch.Tensor], inits: list[int],
              paged: list[tuple[list[int], int] | None] | None = None) -> list[int]:
    """Fill each view (strided allowed) in turn, in C order, from the open file `f` at its position; returns each
    view's bytes' zlib.crc32 continuing from inits[i] (the file position is left as it was).

    Where paged[i] is (block table, tokens), views[i] is a block pool's field (blocks, heads, block_tokens, width)
    and takes the file's (1, heads, tokens, width) tensor: token t of each head in row t % block_tokens of block
    table[t // block_tokens]. Natively: one pass, each 256 KiB chunk checksummed right after it lands, the work split
    over the intra-op threads, the GIL released; else view by view.
    """
    paged = paged or [None] * len(views)
    if _codec() is not None:
        tables = [[] if p is None else p[0] for p in paged]
        tokens = [-1 if p is None else p[1] for p in paged]
        return [crc & 0xFFFFFFFF for crc in _codec().read_into(f.fileno(), f.tell(), views, inits, tables, tokens)]
    crcs, offset = [], f.tell()
    for view, crc, spec in zip(views, inits, paged, strict=True):
        target = view if spec is None else torch.empty(view.shape[1], spec[1], view.shape[3], dtype=view.dtype)
        for piece in runs(target):
            buffer, done = memoryview(piece.view(torch.uint8).numpy()), 0
            while done < len(buffer):
                got = os.preadv(f.fileno(), [buffer[done:]], offset)
                if not got:
                    raise ValueError("the file ended early")
                done, offset = done + got, offset + got
            crc = zlib.crc32(buffer, crc)
        if spec is not None:  # read in the file's order: now into the blocks
            (table, n), bt = spec, view.shape[2]
            for j, start in enumerate(range(0, n, bt)):
                view[table[j], :, :min(bt, n - start)] = target[:, start:start + bt]
        crcs.append(crc)
    return crcs


def evict_lines(tensors: list[torch.Tensor]) -> bool:
    """Evict every cache line of `tensors` (contiguous, CPU) from the caches; False where that cannot be done (no
    native codec, or not x86)."""
    return _codec() is not None and bool(_codec().evict_lines(tensors))


def crc32(t: torch.Tensor, init: int = 0) -> int:
    """zlib.crc32 of a contiguous CPU tensor's bytes continuing from `init`: natively by carry-less multiplication
    (10+ GB/s, the GIL released), else by zlib."""
    if _codec() is None:
        return zlib.crc32(t.view(torch.uint8).reshape(-1).numpy(), init)
    return _codec().crc32(t, init) & 0xFFFFFFFF

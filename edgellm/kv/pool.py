"""One preallocated arena of fixed-size KV blocks shared by every agent's cache, under a byte budget.

A block holds what one layer needs for `block_tokens` tokens in one KV format (dense K/V, or packed codes plus
fp16 scales/zeros). Blocks are reference counted so caches can share a common prefix (copy-on-write).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.kv.formats import DENSE, QUANTIZED, KVFormat, ModelShape
from edgellm.kv.paged import PagedKVCache
from edgellm.kv.quantized import head_group

DEFAULT_BLOCK_TOKENS = 256  # the seed paper's block size
ALIGN = 64  # every field starts on a cache line, which also satisfies any dtype's alignment
MADV_HUGEPAGE = 14


class PoolExhausted(EdgeLLMError):
    """No free block is left in the KV pool: evict an agent or raise the pool's byte budget."""


def advise_hugepages(t: torch.Tensor) -> bool:
    """Ask Linux to back `t`'s whole pages with transparent huge pages (fewer TLB misses); True if accepted.

    Only advice: the kernel may still use small pages, and nothing changes where THP is unavailable.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    start = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    length = (t.data_ptr() + t.nbytes - start) // mmap.PAGESIZE * mmap.PAGESIZE
    if length <= 0:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_HUGEPAGE) == 0


class BlockPool:
    """Fixed-size blocks carved from ONE uint8 arena of `budget_bytes`: a free list, refcounts, typed views.

    `fields[name]` is a (capacity_blocks, kv_heads, block_tokens, width) view of the arena for each tensor a
    cache of this format holds, named as in the contiguous cache's `state()` ("keys", "keys.scales", ...).
    `dtype` is the model's dtype: quantized K/V are rounded to it before quantizing, as QuantizedKVCache does.
    """

    def __init__(self, model_args: ModelShape, fmt: KVFormat, budget_bytes: int,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if fmt.quantized and (fmt.scheme != "token" or fmt.window):
            raise InvalidRequestError(f"paged KV format {fmt} is not supported yet: the block pool holds dense or "
                                      "per-token quantized formats without a full-precision window (e.g. q4, fp16)")
        if block_tokens < 1:
            raise InvalidRequestError(f"block_tokens must be >= 1, got {block_tokens}")
        heads, head_dim = model_args.num_key_value_heads, model_args.head_dim
        self.fmt, self.kv_heads, self.head_dim, self.block_tokens = fmt, heads, head_dim, block_tokens
        self.dtype, self.hadamard = dtype, fmt.hadamard
        if fmt.quantized:
            self.bits, self.group = QUANTIZED[fmt.kind], head_group(fmt.group, head_dim)
            if head_dim % self.group or self.group % (8 // self.bits):
                raise InvalidRequestError(f"KV group {fmt.group} must divide head_dim {head_dim} and be a multiple "
                                          f"of {8 // self.bits} for {self.bits}-bit codes")
            per_tensor = [("data", torch.uint8, head_dim * self.bits // 8), ("scales", torch.float16,
                          head_dim // self.group), ("zeros", torch.float16, head_dim // self.group)]
            layout = [(f"{kv}.{part}", dt, w) for kv in ("keys", "values") for part, dt, w in per_tensor]
        else:
            layout = [(kv, DENSE[fmt.kind], head_dim) for kv in ("keys", "values")]
        offsets, size = [], 0
        for _, dt, width in layout:
            offsets.append(size)
            size += -(-heads * block_tokens * width * dt.itemsize // ALIGN) * ALIGN
        self.block_bytes = size
        self.capacity_blocks = budget_bytes // size
        if self.capacity_blocks < 1:
            raise InvalidRequestError(f"KV pool budget {budget_bytes} bytes is below one block ({size} bytes)")
        self.arena = torch.empty(budget_bytes, dtype=torch.uint8, device=device)
        self.hugepages = advise_hugepages(self.arena)
        self.rows = self.arena[: self.capacity_blocks * size].view(self.capacity_blocks, size)
        self.fields = {name: self.rows[:, off:off + heads * block_tokens * width * dt.itemsize].view(dt)
                       .unflatten(1, (heads, block_tokens, width)) for (name, dt, width), off in zip(layout, offsets,
                                                                                                   strict=True)}
        self.refcounts = [0] * self.capacity_blocks
        self.free_list = list(range(self.capacity_blocks - 1, -1, -1))  # pop() hands out low blocks first

    @property
    def free_blocks(self) -> int:
        return len(self.free_list)

    @property
    def bytes_in_use(self) -> int:
        return (self.capacity_blocks - len(self.free_list)) * self.block_bytes

    def alloc(self, n: int = 1) -> list[int]:
        """`n` blocks, each with refcount 1; all or nothing, so a failed request leaves the pool unchanged."""
        if n > len(self.free_list):
            raise PoolExhausted(f"KV pool exhausted: {n} blocks wanted, {len(self.free_list)} of "
                                f"{self.capacity_blocks} free ({self.block_bytes} bytes each)")
        blocks = [self.free_list.pop() for _ in range(n)]
        for b in blocks:
            self.refcounts[b] = 1
        return blocks

    def share(self, block: int) -> int:
        """One more owner of `block` (a forked cache); it returns to the free list when the last one frees it."""
        self.refcounts[block] += 1
        return block

    def shared(self, block: int) -> bool:
        return self.refcounts[block] > 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds any more become free."""
        for b in blocks:
            self.refcounts[b] -= 1
            if self.refcounts[b] == 0:
                self.free_list.append(b)

    def copy(self, src: int, dst: int) -> None:
        """Copy every byte of block `src` into block `dst` (copy-on-write of a shared block)."""
        self.rows[dst].copy_(self.rows[src])

    def make_caches(self, layers: int) -> list[PagedKVCache]:
        """One empty paged cache per layer; blocks are taken from the pool as tokens arrive."""
        return [PagedKVCache(self) for _ in range(layers)]

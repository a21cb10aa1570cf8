"""KV caches behind one seam: attention calls `update_and_fetch` and never knows the cache kind."""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    """What attention needs from a cache: append this step's K/V, get back everything so far."""

    offset: int

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys`/`values` (batch, kv_heads, new_tokens, head_dim) and return all K/V up to now."""
        ...

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens (used when a new prompt diverges from the cached one)."""
        ...


class DenseKVCache:
    """A preallocated K/V buffer written in place (gpt-fast style): no per-token concatenation.

    Capacity grows geometrically only when a sequence outlives its reservation (e.g. a long chat).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch, kv_heads, max(capacity, 1), head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        b, h, _, d = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros((b, h, new_cap, d), dtype=old.dtype, device=old.device)
            new[:, :, : self.offset] = old[:, :, : self.offset]
            setattr(self, name, new)

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.offset, self.offset + keys.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def trim(self, n: int) -> None:
        self.offset = max(0, self.offset - n)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

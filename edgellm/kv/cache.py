"""KV caches behind one seam: attention calls `cache.attend(q, k, v, mask, scale)` and never knows the cache kind.

Two declared protocols: `AttentionCache` is all a model uses (positions and attention); `KVCache` is what every
per-layer storage kind (dense, quantized, paged) also offers to the rest of the engine: size, trim, state.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from edgellm.errors import InvalidRequestError
from edgellm.kernels.decode import decode_attention


@runtime_checkable
class AttentionCache(Protocol):
    """What a model's attention needs: each batch row's position, and attention that stores the new K/V."""

    @property
    def offsets(self) -> list[int]:
        """Tokens held per batch row: one entry when all rows share a position, else one per row."""
        ...

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Store `keys`/`values` (batch, kv_heads, new, head_dim), then attention of `q` over everything held.

        `mask` is None (causal) or a boolean (new, all tokens) mask, True = attend; GQA heads share K/V.
        """
        ...


@runtime_checkable
class KVCache(AttentionCache, Protocol):
    """One layer's K/V storage, whatever its kind."""

    offset: int

    @property
    def nbytes(self) -> int:
        """Bytes held, reservations included."""
        ...

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys`/`values` (batch, kv_heads, new_tokens, head_dim) and return all K/V up to now."""
        ...

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens (a diverging prompt; rejected draft tokens)."""
        ...

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors exactly as held (quantized stays quantized), cut to `offset` tokens, for saving."""
        ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the contents with a `state()` taken from a cache of the same format."""
        ...


class Layout(NamedTuple):
    """A tensor's shape and dtype without its data: what a file's header says it holds."""

    shape: torch.Size
    dtype: torch.dtype


class BlockTarget(NamedTuple):
    """Where a restore reads one (1, heads, rows, width) tensor of a memory file: row t of each head goes to row
    t % block_rows of block table[t // block_rows] of `field` (blocks, heads, block_rows, width).

    A block pool's field takes a cache's blocks this way; a batch-1 contiguous buffer is one block (table [0]), named
    so instead of by a view: a restore needs ~100 targets, and each view costs it microseconds."""

    field: torch.Tensor
    table: list[int]
    tokens: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.field.shape[1], self.tokens, self.field.shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.field.dtype


def rows_of(buffer: torch.Tensor, rows: int) -> torch.Tensor | BlockTarget:
    """Rows [0, rows) of a contiguous (batch, heads, capacity, width) buffer, as a receive hands them out."""
    return BlockTarget(buffer, [0], rows) if buffer.shape[0] == 1 else buffer.narrow(2, 0, rows)


@runtime_checkable
class ContiguousCache(KVCache, Protocol):
    """A cache holding each (batch row, head) in one strided buffer (dense, quantized): a restore fills it in place."""

    def receive(self, state: dict[str, torch.Tensor | Layout]) -> dict[str, torch.Tensor | BlockTarget]:
        """Make room for a `state()` shaped like `state` and hold it; returns where each entry goes.

        Only shapes and dtypes are read (a `Layout` will do), and checked against this cache's format. Each entry maps
        to this cache's own buffers with its shape (`rows_of`): a restore reads the file straight into them, and the
        cache holds the state once they are filled.
        """
        ...


def load_state(cache: ContiguousCache, state: dict[str, torch.Tensor]) -> None:
    """`cache.load_state` for caches that `receive`: check, make room, copy."""
    for name, target in cache.receive(state).items():
        if isinstance(target, BlockTarget):  # one block: the buffer's first rows
            target = target.field.narrow(2, 0, target.tokens)
        target.copy_(state[name])


class SingleOffset:
    """Mixin for caches whose rows all sit at one position."""

    offset: int

    @property
    def offsets(self) -> list[int]:
        return [self.offset]


class DenseKVCache(SingleOffset):
    """A preallocated K/V buffer written in place (gpt-fast style): no per-token concatenation.

    Capacity grows geometrically only when a sequence outlives its reservation (e.g. a long chat).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch, kv_heads, max(capacity, 1), head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # only [:offset] is ever read
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        b, h, _, d = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty((b, h, new_cap, d), dtype=old.dtype, device=old.device)
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

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        keys, values = self.update_and_fetch(keys, values)
        if q.shape[2] == 1 and mask is None:  # a decode step: one query sees every cached position
            return decode_attention(q, keys, values, scale)
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale,
                                              is_causal=mask is None, enable_gqa=q.shape[1] != keys.shape[1])

    def trim(self, n: int) -> None:
        self.offset = max(0, self.offset - n)

    def state(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys[:, :, : self.offset], "values": self.values[:, :, : self.offset]}

    def receive(self, state: dict[str, torch.Tensor | Layout]) -> dict[str, torch.Tensor]:
        if set(state) != {"keys", "values"}:
            raise InvalidRequestError(f"saved state holds {sorted(state)}, a dense cache holds ['keys', 'values']")
        keys, values = state["keys"], state["values"]
        b, h, _, d = self.keys.shape
        for t in (keys, values):
            if t.dtype != self.keys.dtype or len(t.shape) != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, h, d) \
                    or t.shape != keys.shape:
                raise InvalidRequestError(f"saved K/V {tuple(t.shape)} {t.dtype} do not fit this cache "
                                          f"({b}, {h}, *, {d}) {self.keys.dtype}")
        self.offset = 0  # nothing held is kept: a grow copies nothing
        if keys.shape[2] > self.capacity:
            self._grow(keys.shape[2])
        self.offset = keys.shape[2]
        return {"keys": rows_of(self.keys, self.offset), "values": rows_of(self.values, self.offset)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        load_state(self, state)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def causal_mask(offset: int, t: int, window: int | None, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Which cached positions `t` new tokens at `offset` may see (True = attend), for a sliding window too.

    None when SDPA's own causal flag (offset 0) or no mask at all (one token, no window in reach) suffices.
    """
    total = offset + t
    windowed = window is not None and total > window
    if not windowed and (t == 1 or offset == 0):
        return None
    q_pos = torch.arange(offset, total, device=device).unsqueeze(1)
    k_pos = torch.arange(total, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if windowed:
        mask &= (q_pos - k_pos) < window
    return mask

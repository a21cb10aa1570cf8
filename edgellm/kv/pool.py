"""One preallocated arena of fixed-size KV blocks shared by every agent's cache, and the paged cache drawn from it.

A block holds what one layer needs for `block_tokens` tokens in one KV format (dense K/V, or packed codes plus
fp16 scales/zeros). Blocks are reference counted so caches can share a common prefix (copy-on-write), and full
blocks can be published under the hash of every token up to their end, so a cache starting with the same tokens
(agents with one system prompt or tool preamble) takes them over instead of computing and storing them again.
The pool and PagedKVCache live together because the cache indexes the pool's field layout directly.

A PagedKVCache's `state()` returns exactly the tensors (names, dtypes, shapes) of the contiguous cache of the same
format, so a memory file saved from a paged cache restores into a contiguous one and back, bit for bit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import mmap
import sys
import weakref
from collections.abc import Iterator

import torch

from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.kernels.decode import paged_decode_attention
from edgellm.kernels.kvattn import NATIVE_MAX_ROWS, PackedKV, packed_attention
from edgellm.kv.cache import BlockTarget, Layout, SingleOffset
from edgellm.kv.codec import QuantizedTensor, dequantize, hadamard, quantize
from edgellm.kv.formats import DENSE, QUANTIZED, KVFormat
from edgellm.kv.quantized_cache import (
    PREFILL_SPAN,
    STORED_CHUNK_MAX,
    blockwise_attention,
    head_group,
    merge_attention,
    prefill_attention,
    span_attention,
)
from edgellm.layouts import ModelShape

DEFAULT_BLOCK_TOKENS = 256  # the seed paper's block size
ALIGN = 64  # every field starts on a cache line, which also satisfies any dtype's alignment
MADV_HUGEPAGE = 14


class PoolExhausted(EdgeLLMError):
    """No free block is left in the KV pool: evict an agent or raise the pool's byte budget."""


def block_key(previous: bytes, tokens: list[int]) -> bytes:
    """The key of a full block: a hash of the previous block's key and this block's token ids, so equal keys mean
    equal tokens from position 0 to the block's end (and so equal K/V)."""
    return hashlib.blake2b(previous + b"".join(t.to_bytes(4, "little") for t in tokens), digest_size=16).digest()


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
        if not self.supports(fmt):
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
        self.prefixes: dict[bytes, list[int]] = {}  # published full blocks: key -> the block of every layer
        self.published: dict[int, bytes] = {}  # block -> the key it is published under

    @staticmethod
    def supports(fmt: KVFormat) -> bool:
        """Whether blocks can hold `fmt`: dense, or quantized per token without a full-precision window."""
        return not fmt.quantized or (fmt.scheme == "token" and not fmt.window)

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
        """Whether a write into `block` must copy it first: another cache holds it, or it is published."""
        return self.refcounts[block] > 1 or block in self.published

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds any more become free (and unpublished)."""
        for b in blocks:
            self.refcounts[b] -= 1
            if self.refcounts[b] == 0:
                self.free_list.append(b)
                key = self.published.pop(b, None)
                for other in self.prefixes.pop(key, ()) if key is not None else ():
                    self.published.pop(other, None)

    def publish(self, key: bytes, blocks: list[int]) -> None:
        """Offer `blocks` (one per layer, full, holding the tokens `key` names) to caches that start the same way;
        the first blocks published under a key stay its blocks while anyone holds them."""
        if key not in self.prefixes and not any(b in self.published for b in blocks):
            self.prefixes[key] = list(blocks)
            self.published.update((b, key) for b in blocks)

    def lookup(self, tokens: list[int], limit: int) -> list[list[int]]:
        """The published blocks (per block, one per layer) that hold `tokens`' leading full blocks, up to `limit`
        tokens."""
        found: list[list[int]] = []
        key, bt = b"", self.block_tokens
        for start in range(0, limit - bt + 1, bt):
            key = block_key(key, tokens[start:start + bt])
            blocks = self.prefixes.get(key)
            if blocks is None:
                break
            found.append(blocks)
        return found

    @property
    def shared_blocks(self) -> int:
        """Blocks held by more than one cache (each stored once)."""
        return sum(1 for r in self.refcounts if r > 1)

    def copy(self, src: int, dst: int) -> None:
        """Copy every byte of block `src` into block `dst` (copy-on-write of a shared block)."""
        self.rows[dst].copy_(self.rows[src])

    def make_caches(self, layers: int) -> list[PagedKVCache]:
        """One empty paged cache per layer; blocks are taken from the pool as tokens arrive."""
        return [PagedKVCache(self) for _ in range(layers)]


class PagedKVCache(SingleOffset):
    """One layer's K/V for one sequence (batch 1): token i lives in block `table[i // block_tokens]`.

    Blocks are taken lazily as tokens arrive (or up front with `reserve`); a block shared with a fork is copied
    before its first write. Blocks still held when the cache is garbage collected go back to the pool.
    """

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.table: list[int] = []  # mutated in place: the finalizer below frees whatever it holds at the end
        self.offset = 0
        self._finalizer = weakref.finalize(self, pool.free, self.table)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks this cache holds (a block shared with a fork counts in both)."""
        return len(self.table) * self.pool.block_bytes

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.pool.block_tokens)

    def blocks_needed(self, tokens: int) -> int:
        """Fresh blocks that holding `tokens` tokens needs: new table entries plus a copy of a shared tail."""
        if tokens <= self.offset:
            return 0
        tail = self.offset // self.pool.block_tokens
        cow = tail < len(self.table) and self.pool.shared(self.table[tail])
        return max(0, self._blocks_for(tokens) - len(self.table)) + cow

    def reserve(self, tokens: int) -> None:
        """Take every block that writing up to `tokens` tokens needs now, so a forward pass cannot run out midway.

        Raises PoolExhausted, with nothing changed, when the pool has too few free blocks.
        """
        fresh = self.pool.alloc(self.blocks_needed(tokens))
        if not fresh:
            return
        tail = self.offset // self.pool.block_tokens
        if tail < len(self.table) and self.pool.shared(self.table[tail]):  # copy-on-write of a shared tail
            new = fresh.pop()
            self.pool.copy(self.table[tail], new)
            self.pool.free([self.table[tail]])
            self.table[tail] = new
        self.table.extend(fresh)

    def _append(self, fields: dict[str, torch.Tensor]) -> None:
        """Write (kv_heads, n, width) tensors per pool field at tokens offset..offset+n, all blocks in one scatter."""
        n = next(iter(fields.values())).shape[1]
        end = self.offset + n
        self.reserve(end)
        bt = self.pool.block_tokens
        if n == 1:  # a decode step: one row per field, written without index tensors (a few ATen ops fewer)
            block, row = self.table[self.offset // bt], self.offset % bt
            for name, x in fields.items():
                self.pool.fields[name][block, :, row] = x[:, 0]
            self.offset = end
            return
        pos = torch.arange(self.offset, end)
        blocks = torch.tensor(self.table, dtype=torch.long)[pos // bt]
        for name, x in fields.items():
            field = self.pool.fields[name]
            field.permute(0, 2, 1, 3)[blocks, pos % bt] = x.transpose(0, 1).to(field.dtype)
        self.offset = end

    def _encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """This step's K/V (1, kv_heads, n, D) as the pool's fields hold them (quantized exactly as the
        contiguous QuantizedKVCache does: rotated, cast to the model dtype, then quantized)."""
        if keys.shape[0] != 1:
            raise InvalidRequestError(f"a paged KV cache holds one sequence, got a batch of {keys.shape[0]}")
        pool = self.pool
        if not pool.fmt.quantized:
            return {"keys": keys[0], "values": values[0]}
        keys = (hadamard(keys.float()) if pool.hadamard else keys).to(pool.dtype)
        fields = {}
        for name, x in (("keys", keys), ("values", values.to(pool.dtype))):
            q = quantize(x[0], pool.bits, pool.group)
            fields |= {f"{name}.data": q.data, f"{name}.scales": q.scales, f"{name}.zeros": q.zeros}
        return fields

    def _gather(self, name: str) -> torch.Tensor:
        """Field `name` of tokens 0..offset as one (1, kv_heads, offset, width) tensor (a copy)."""
        blocks = self.pool.fields[name][self._table()]  # (blocks, heads, block_tokens, width)
        return blocks.transpose(0, 1).flatten(1, 2)[:, : self.offset].unsqueeze(0)

    def _read(self, name: str, block: int, n: int) -> torch.Tensor:
        """The first `n` tokens of K or V in `block`, as fp32 (1, kv_heads, n, D)."""
        pool = self.pool
        if not pool.fmt.quantized:
            return pool.fields[name][block, :, :n].unsqueeze(0).float()
        parts = [pool.fields[f"{name}.{p}"][block, :, :n].unsqueeze(0) for p in ("data", "scales", "zeros")]
        return dequantize(QuantizedTensor(*parts, pool.bits, pool.group, (1, pool.kv_heads, n, pool.head_dim)))

    def _blocks(self, per: int = 1) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first token, K, V) in fp32, `per` pool blocks at a time."""
        bt = self.pool.block_tokens
        used = self.table[: self._blocks_for(self.offset)]
        for i in range(0, len(used), per):
            span = [(block, min(bt, self.offset - j * bt)) for j, block in enumerate(used[i:i + per], i)]
            k, v = (torch.cat([self._read(name, block, n) for block, n in span], 2) for name in ("keys", "values"))
            yield i * bt, k, v

    def _table(self, tokens: int | None = None) -> torch.Tensor:
        """The blocks holding tokens 0..tokens (default: all held), as int64 (pages)."""
        return torch.tensor(self.table[: self._blocks_for(self.offset if tokens is None else tokens)],
                            dtype=torch.long)

    def _rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Tokens start..end of K or V as stored, fp32 (1, kv_heads, n, D); keys still rotated."""
        bt = self.pool.block_tokens
        return torch.cat([self._read(name, self.table[j], min(end - j * bt, bt))[:, :, max(start - j * bt, 0):]
                          for j in range(start // bt, self._blocks_for(end))], 2)

    def _native(self, rows: torch.Tensor, tokens: int, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(output, lse), fp32, of query `rows` (B, kv_heads, R, D; fp32, rotated as the keys were) over the
        first `tokens` tokens by the native kernel, reading the pool's blocks in place, NATIVE_MAX_ROWS rows a
        call; None where it does not apply (a dense pool, or the kernel's own limits)."""
        pool = self.pool
        if not pool.fmt.quantized:
            return None
        packed = [PackedKV(*(pool.fields[f"{name}.{part}"] for part in ("data", "scales", "zeros")), pool.group)
                  for name in ("keys", "values")]
        table = self._table(tokens).unsqueeze(0)
        none = rows.new_zeros(rows.shape[0], pool.kv_heads, 0, rows.shape[3])
        found = [packed_attention(rows[:, :, r:r + NATIVE_MAX_ROWS], *packed, pool.bits, table, pool.block_tokens,
                                  tokens, none, none, scale) for r in range(0, rows.shape[2], NATIVE_MAX_ROWS)]
        if any(f is None for f in found):
            return None
        return torch.cat([f[0] for f in found], 2), torch.cat([f[1] for f in found], 2)

    def _stored(self, q: torch.Tensor, start: int, scale: float) -> torch.Tensor | None:
        """Causal attention of a short chunk, already stored at start.., over the cache as stored (what decode steps
        would see): the tokens before it natively, its own rows (dequantized) directly, merged by log-sum-exp.
        A decode step is one native call. None where the kernel does not apply."""
        pool = self.pool
        b, n_heads, t, d = q.shape
        rows = q.float().reshape(b, pool.kv_heads, n_heads // pool.kv_heads * t, d)
        rows = hadamard(rows) if pool.hadamard else rows
        parts = []
        if past_tokens := start + 1 if t == 1 else start:  # a decode step attends to its own token natively too
            past = self._native(rows, past_tokens, scale)
            if past is None:
                return None
            parts.append(past)
        if t > 1:
            k, v = (self._rows(name, start, start + t) for name in ("keys", "values"))
            scores = (rows @ k.transpose(2, 3)).mul_(scale).view(b, pool.kv_heads, -1, t, t)
            scores = scores.masked_fill_(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).flatten(2, 3)
            lse = scores.logsumexp(-1)
            parts.append(((scores - lse.unsqueeze(-1)).exp_() @ v, lse))
        return merge_attention(parts).view(b, n_heads, t, d).to(q.dtype)

    def _past(self, q: torch.Tensor, mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, lse) of a prefill chunk's queries over the tokens held before it, exactly as held."""
        if mask is not None and bool(mask.all()):
            mask = None
        per = max(1, PREFILL_SPAN // self.pool.block_tokens)
        return span_attention(q, self._blocks(per), mask, scale, self.pool.hadamard)

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store, then return every token's K/V (materialises the cache; `attend` does not)."""
        self._append(self._encode(keys, values))
        pool = self.pool
        if not pool.fmt.quantized:
            return self._gather("keys"), self._gather("values")
        shape = (1, pool.kv_heads, self.offset, pool.head_dim)
        k, v = (dequantize(QuantizedTensor(*(self._gather(f"{name}.{p}") for p in ("data", "scales", "zeros")),
                                           pool.bits, pool.group, shape)) for name in ("keys", "values"))
        return (hadamard(k) if pool.hadamard else k).to(pool.dtype), v.to(pool.dtype)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Store `keys`/`values`, then attention over the cache, as QuantizedKVCache.attend does for a quantized
        pool (a prefill chunk attends to its own K/V exactly; decode steps and short chunks over the blocks in place,
        natively); a dense pool decodes natively over the blocks in place too, and otherwise attends in spans of
        blocks with an online softmax."""
        start, t = self.offset, q.shape[2]
        if t > STORED_CHUNK_MAX and self.pool.fmt.quantized:
            past = self._past(q, None if mask is None else mask[:, :start], scale) if start else None
            self._append(self._encode(keys, values))
            return prefill_attention(q, keys, values, mask, scale, past)
        self._append(self._encode(keys, values))
        pool = self.pool
        causal = mask is None or (bool(mask[:, :start].all()) and torch.equal(mask[:, start:], torch.ones(
            t, t, dtype=torch.bool, device=mask.device).tril()))  # no sliding window in reach
        if t == 1 and causal and not pool.fmt.quantized:
            out = paged_decode_attention(q, pool.fields["keys"], pool.fields["values"], self._table(), self.offset,
                                         scale)
            if out is not None:
                return out
        if pool.fmt.quantized and causal:
            out = self._stored(q, start, scale)
            if out is not None:
                return out
        per = max(1, PREFILL_SPAN // pool.block_tokens)
        return blockwise_attention(q, self._blocks(per), pool.kv_heads, start, mask, scale, pool.hadamard)

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens and give back whole blocks past the new end (`trim(0)` drops reservations)."""
        self.offset = max(0, self.offset - n)
        keep = self._blocks_for(self.offset)
        self.pool.free(self.table[keep:])
        del self.table[keep:]

    def state(self) -> dict[str, torch.Tensor]:
        """The contiguous cache's tensors for tokens 0..offset: same names, dtypes and shapes (batch 1)."""
        return {name: self._gather(name) for name in self.pool.fields}

    def _held_in(self, state: dict[str, torch.Tensor | Layout]) -> int:
        """Tokens a `state()` of a cache of this format holds, after checking names, shapes and dtypes."""
        pool = self.pool
        if set(state) != set(pool.fields):
            raise InvalidRequestError(f"saved state holds {sorted(state)}, a {pool.fmt} cache holds "
                                      f"{sorted(pool.fields)}")
        first = next(iter(state.values()))
        tokens = first.shape[2] if len(first.shape) == 4 else -1
        for name, t in state.items():
            field = pool.fields[name]
            if tuple(t.shape) != (1, pool.kv_heads, tokens, field.shape[3]) or t.dtype != field.dtype:
                raise InvalidRequestError(f"saved {name} {tuple(t.shape)} {t.dtype} does not match this {pool.fmt} "
                                          f"cache (kv_heads {pool.kv_heads}, width {field.shape[3]}, {field.dtype})")
        return tokens

    def load_state(self, state: dict[str, torch.Tensor], held: int = 0) -> None:
        """Replace the contents with a `state()` of a paged or contiguous cache of the same format; all or nothing.

        `held`: the cache already holds the state's first `held` tokens (adopted shared blocks, so a block
        boundary), which are kept; only the rest is written.
        """
        tokens = self._held_in(state)
        if held and (held != self.offset or held != len(self.table) * self.pool.block_tokens or held > tokens):
            raise InvalidRequestError(f"a paged cache keeps its first {held} tokens only when it holds exactly "
                                      "those, on a block boundary, and the state has at least as many")
        fresh = self.pool.alloc(self._blocks_for(tokens) - (len(self.table) if held else 0))
        if not held:
            self.release()
        self.table.extend(fresh)
        if tokens > held:
            self._append({name: t[0, :, held:] for name, t in state.items()})

    def receive(self, state: dict[str, torch.Tensor | Layout]) -> dict[str, BlockTarget]:
        """Take blocks for a `state()` shaped like `state` (Layouts will do) and hold it; returns where each entry
        goes, for a restore to read the file straight into the blocks. PoolExhausted, nothing changed, when too few
        blocks are free."""
        tokens = self._held_in(state)
        fresh = self.pool.alloc(self._blocks_for(tokens))
        self.release()
        self.table.extend(fresh)
        self.offset = tokens
        return {name: BlockTarget(self.pool.fields[name], self.table, tokens) for name in state}

    @staticmethod
    def receive_all(caches: list[PagedKVCache], states: list[dict[str, torch.Tensor | Layout]]
                    ) -> list[dict[str, BlockTarget]]:
        """`receive` for every layer of a sequence at once: the states must all be alike (a pool has one format), so
        one is checked, and every layer's blocks come from one allocation (PoolExhausted, nothing taken, when too few
        are free). A restore right after a decode step paid ~20 us a layer for the layer-by-layer calls."""
        if len(states) != len(caches) or any(state != states[0] for state in states):
            raise InvalidRequestError(f"saved layers hold different tensors ({len(states)} states for "
                                      f"{len(caches)} layers): a paged cache's layers all hold one format")
        if not caches:
            return []
        tokens = caches[0]._held_in(states[0])
        pool, per = caches[0].pool, caches[0]._blocks_for(tokens)
        fresh = pool.alloc(per * len(caches))
        out = []
        for i, cache in enumerate(caches):
            cache.release()
            cache.table.extend(fresh[i * per:(i + 1) * per])
            cache.offset = tokens
            out.append({name: BlockTarget(pool.fields[name], cache.table, tokens) for name in states[0]})
        return out

    def share_published(self, blocks: list[int]) -> None:
        """Hold the published `blocks` (one per leading full block, the same tokens) instead of private copies."""
        for i, block in enumerate(blocks):
            if self.table[i] != block:
                self.pool.free([self.table[i]])
                self.table[i] = self.pool.share(block)

    def adopt(self, blocks: list[int]) -> None:
        """Append blocks other caches hold (full ones, the tokens right after this cache's, which must end on a
        block boundary): shared, copy-on-write, never recomputed."""
        if self.offset != len(self.table) * self.pool.block_tokens:
            raise InvalidRequestError("a paged cache adopts shared blocks only from a block boundary, with no "
                                      "blocks reserved past its tokens")
        self.table.extend(self.pool.share(b) for b in blocks)
        self.offset += len(blocks) * self.pool.block_tokens

    def private_blocks(self) -> int:
        """Blocks only this cache holds: what releasing it gives back to the pool."""
        return sum(1 for b in self.table if self.pool.refcounts[b] == 1)

    def fork(self, tokens: int | None = None) -> PagedKVCache:
        """A cache holding this one's first `tokens` tokens (all by default) by sharing its blocks, copy-on-write."""
        tokens = self.offset if tokens is None else min(tokens, self.offset)
        child = PagedKVCache(self.pool)
        child.table.extend(self.pool.share(b) for b in self.table[: self._blocks_for(tokens)])
        child.offset = tokens
        return child

    def release(self) -> None:
        """Give every block back to the pool; the cache is empty afterwards."""
        self.pool.free(self.table)
        self.table.clear()
        self.offset = 0

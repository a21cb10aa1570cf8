"""A KV cache held as packed low-bit codes, with attention computed block by block over it.

Two schemes:
- "token": keys and values quantized per token, groups along head_dim (the seed paper's / mlx-lm's scheme);
- "kivi": keys quantized per channel (groups of `group` tokens along the sequence), values per token, with the
  most recent `window`..`window + group - 1` tokens kept in full precision until a whole key group can be closed.
With `hadamard`, keys are rotated before quantizing; attention rotates the queries instead of un-rotating keys.
A whole-model decode step over these caches mostly bypasses `attend`: the fused native step (models/fused.py) stores
the token and attends over the codes in place, bit for bit as `_store` stores and as the native kernel attends.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import torch

from edgellm.errors import InvalidRequestError
from edgellm.kernels.kvattn import PackedKV, packed_attention, quantize_into
from edgellm.kv.cache import BlockTarget, Layout, SingleOffset, load_state, rows_of
from edgellm.kv.codec import BITS, QuantizedTensor, dequantize, hadamard, quantize
from edgellm.layouts import SCHEMES, head_group

# Chunks up to this long (a speculative check of up to 64 drafts) store first and attend over what is stored, as
# decode steps do, so each drafted position sees exactly the cache plain decoding would have; longer chunks (a
# prefill) attend to their own K/V exactly and quantize on store, which keeps prefill into a quantized cache cheap.
STORED_CHUNK_MAX = 65
ATTENTION_BLOCK = 256  # tokens dequantized at a time: bounds attention's float scratch memory
PREFILL_SPAN = 2048  # past tokens dequantized at a time for a prefill chunk: fewer, larger attention calls
FIELDS = {kv: (f"{kv}.data", f"{kv}.scales", f"{kv}.zeros") for kv in ("keys", "values")}  # a state()'s names
_PACKED_STATE = frozenset(FIELDS["keys"] + FIELDS["values"])
_WINDOWED_STATE = _PACKED_STATE | {"keys.window", "values.window"}


def blockwise_attention(q: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor, torch.Tensor]], kv_heads: int,
                        start: int, mask: torch.Tensor | None, scale: float, rotate: bool = False) -> torch.Tensor:
    """softmax(q·Kᵀ·scale)·V merged over `blocks` of (first token, K, V) in fp32 with an online softmax.

    q is (B, n_rep·kv_heads, t, D), positions start..start+t-1. `mask` is None (causal) or a boolean
    (t, all tokens) mask, True = attend. A running max and sum merge the blocks, so only one block of K/V is ever
    in float; `rotate` applies the Hadamard rotation the keys were stored with to the queries instead.
    """
    b, n_heads, t, d = q.shape
    rep = n_heads // kv_heads
    qf = q.float().reshape(b, kv_heads, rep * t, d)
    if rotate:
        qf = hadamard(qf)
    q_pos = torch.arange(start, start + t, device=q.device).unsqueeze(1)
    run_max = torch.full((b, kv_heads, rep * t, 1), float("-inf"), device=q.device)
    run_sum = torch.zeros_like(run_max)
    acc = torch.zeros_like(qf)
    for k0, k, v in blocks:
        n = k.shape[2]
        scores = (qf @ k.transpose(2, 3)).mul_(scale)
        if mask is not None:
            allowed = mask[:, k0:k0 + n]
        elif k0 + n - 1 > start:  # only blocks reaching past the first query need the causal cut
            allowed = torch.arange(k0, k0 + n, device=q.device) <= q_pos
        else:
            allowed = None
        if allowed is not None:
            scores = scores.view(b, kv_heads, rep, t, n).masked_fill_(~allowed, float("-inf"))
            scores = scores.view(b, kv_heads, rep * t, n)
        new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows that have seen no key yet
        probs = scores.sub_(shift).exp_()
        rescale = (run_max - shift).exp_()
        run_sum = run_sum.mul_(rescale).add_(probs.sum(-1, keepdim=True))
        acc = acc.mul_(rescale).add_(probs @ v)
        run_max = new_max
    return acc.div_(run_sum).view(b, n_heads, t, d).to(q.dtype)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, causal: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU flash kernel in q's dtype (GQA allowed), which also returns the log-sum-exp (B, H, t) in fp32.

    It reads its inputs as if head_dim were contiguous, so the transposed per-channel keys are copied first; and
    it reports lse 0 for a row that may see no key, which must weigh nothing when merged (-inf).
    """
    bias = None if allowed is None else torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
    q, k, v = (x.to(q.dtype).contiguous() for x in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                           scale=scale)
    return out, lse if allowed is None else lse.masked_fill_(~allowed.any(-1), float("-inf"))


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over disjoint sets of keys from each set's (output, log-sum-exp), in fp32.

    A row that saw no key of a set has lse -inf there (and maybe a NaN output): it weighs nothing.
    """
    if len(parts) == 1:
        return parts[0][0].float()
    lse = torch.stack([lse for _, lse in parts]).logsumexp(0).unsqueeze(-1)
    out = torch.zeros(parts[0][0].shape, dtype=torch.float32, device=parts[0][0].device)
    for o, part_lse in parts:
        weight = (part_lse.unsqueeze(-1) - lse).exp_()
        out += torch.where(weight > 0, o.float() * weight, 0.0)
    return out


def span_attention(q: torch.Tensor, spans: Iterable[tuple[int, torch.Tensor, torch.Tensor]], mask: torch.Tensor | None,
                   scale: float, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output fp32, lse) of q (B, H, t, D) over `spans` of (first token, K, V) all before the queries' positions.

    `mask` is None (every token allowed) or a boolean (t, tokens) mask over absolute positions, True = attend;
    each span runs through the flash kernel in q's dtype, so a long prefill chunk attends like a dense cache's.
    """
    qr = hadamard(q.float()).to(q.dtype) if rotate else q
    parts = []
    for k0, k, v in spans:
        allowed = None if mask is None else mask[:, k0:k0 + k.shape[2]]
        if allowed is None or allowed.any():
            parts.append(_flash(qr, k, v, allowed, False, scale))
    if not parts:
        return q.new_zeros(q.shape, dtype=torch.float32), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    return merge_attention(parts), torch.stack([lse for _, lse in parts]).logsumexp(0)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, past: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """A chunk of t new tokens attending to its own exact K/V (causal) merged with `past`, its (output, lse) over
    the tokens held before it. `mask` is None (causal) or the boolean (t, all tokens) mask; returns q's dtype."""
    t = q.shape[2]
    allowed = None if mask is None else mask[:, mask.shape[1] - t:]
    causal = allowed is None or torch.equal(allowed, torch.ones(t, t, dtype=torch.bool, device=q.device).tril())
    own = _flash(q, keys, values, None if causal else allowed, causal, scale)
    return merge_attention([own] if past is None else [past, own]).to(q.dtype)


class _PackedBuffer:
    """Preallocated packed codes and fp16 scales/zeros for one of K or V; tokens on dim 2.

    Per-token layout: data (B, H, T, D·bits/8), scales/zeros (B, H, T, D/group).
    Per-channel layout: data (B, H, T·bits/8, D), scales/zeros (B, H, T/group, D).
    """

    def __init__(self, batch: int, heads: int, head_dim: int, bits: int, group: int, per_channel: bool,
                 capacity: int, device: torch.device | str) -> None:
        self.shape, self.bits, self.group, self.per_channel = (batch, heads, head_dim), bits, group, per_channel
        self.device = device
        self.data, self.scales, self.zeros = self._alloc(self._round(capacity))

    def _round(self, tokens: int) -> int:
        unit = self.group if self.per_channel else 1
        return -(-max(tokens, 1) // unit) * unit

    def _rows(self, tokens: int) -> tuple[int, int]:
        """Rows of data and of scales that `tokens` tokens occupy."""
        if self.per_channel:
            return tokens * self.bits // 8, tokens // self.group
        return tokens, tokens

    def _alloc(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, h, d = self.shape
        data_rows, scale_rows = self._rows(capacity)
        data_w, scale_w = (d, d) if self.per_channel else (d * self.bits // 8, d // self.group)
        return (torch.empty((b, h, data_rows, data_w), dtype=torch.uint8, device=self.device),  # read to offset only
                torch.empty((b, h, scale_rows, scale_w), dtype=torch.float16, device=self.device),
                torch.empty((b, h, scale_rows, scale_w), dtype=torch.float16, device=self.device))

    @property
    def capacity(self) -> int:
        return self.scales.shape[2] * (self.group if self.per_channel else 1)

    def _grow(self, needed: int, held: int) -> None:
        new = self._alloc(self._round(max(needed, 2 * self.capacity)))
        data_rows, scale_rows = self._rows(held)
        new[0][:, :, :data_rows] = self.data[:, :, :data_rows]
        new[1][:, :, :scale_rows] = self.scales[:, :, :scale_rows]
        new[2][:, :, :scale_rows] = self.zeros[:, :, :scale_rows]
        self.data, self.scales, self.zeros = new

    def write(self, start: int, x: torch.Tensor) -> None:
        """Quantize `x` (B, H, n, D) into tokens [start, start + n); per-channel needs whole groups."""
        end = start + x.shape[2]
        if end > self.capacity:
            self._grow(end, start)
        (d0, s0), (d1, s1) = self._rows(start), self._rows(end)
        if not self.per_channel and quantize_into(x, self.bits, self.group, self.data[:, :, d0:d1],
                                                  self.scales[:, :, s0:s1], self.zeros[:, :, s0:s1]):
            return
        q = quantize(x, self.bits, self.group, dim=2 if self.per_channel else -1)
        self.data[:, :, d0:d1] = q.data
        self.scales[:, :, s0:s1] = q.scales
        self.zeros[:, :, s0:s1] = q.zeros

    def read(self, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) dequantized to fp32 (B, H, end - start, D)."""
        (d0, s0), (d1, s1) = self._rows(start), self._rows(end)
        q = QuantizedTensor(self.data[:, :, d0:d1], self.scales[:, :, s0:s1], self.zeros[:, :, s0:s1], self.bits,
                            self.group, (*self.shape[:2], end - start, self.shape[2]), 2 if self.per_channel else -1)
        return dequantize(q)

    def packed(self) -> PackedKV:
        """The buffers as the native attention reads them."""
        return PackedKV(self.data, self.scales, self.zeros, self.group, self.per_channel)

    def state(self, tokens: int, prefix: str) -> dict[str, torch.Tensor]:
        data_rows, scale_rows = self._rows(tokens)
        return {f"{prefix}.data": self.data[:, :, :data_rows], f"{prefix}.scales": self.scales[:, :, :scale_rows],
                f"{prefix}.zeros": self.zeros[:, :, :scale_rows]}

    def held_in(self, state: dict[str, torch.Tensor | Layout], prefix: str) -> int:
        """Tokens a `state()` holds, after checking it has this buffer's layout (nothing is copied yet)."""
        names = FIELDS[prefix]
        if any(name not in state for name in names):
            raise InvalidRequestError(f"saved state has no {', '.join(names)}: it is not from a quantized cache")
        data, scales, zeros = (state[name] for name in names)
        tokens = scales.shape[2] * (self.group if self.per_channel else 1) if len(scales.shape) == 4 else -1
        data_rows, scale_rows = self._rows(tokens)
        b, h, _, data_w = self.data.shape
        want_data, want_scales = (b, h, data_rows, data_w), (b, h, scale_rows, self.scales.shape[3])
        if (tuple(data.shape), tuple(scales.shape), tuple(zeros.shape)) != (want_data, want_scales, want_scales) or \
                (data.dtype, scales.dtype, zeros.dtype) != (torch.uint8, torch.float16, torch.float16):
            raise InvalidRequestError(f"saved {prefix} do not match this cache's format "
                                      f"({self.bits}-bit, group {self.group}, batch/heads/head_dim {self.shape})")
        return tokens

    def receive(self, prefix: str, tokens: int) -> dict[str, torch.Tensor | BlockTarget]:
        """Room for `tokens` tokens of a `state()` already checked by `held_in`: where its bytes go."""
        if tokens > self.capacity:
            self._grow(tokens, 0)
        data_rows, scale_rows = self._rows(tokens)
        data, scales, zeros = FIELDS[prefix]
        return {data: rows_of(self.data, data_rows), scales: rows_of(self.scales, scale_rows),
                zeros: rows_of(self.zeros, scale_rows)}


@functools.cache
def _empty_window(batch: int, heads: int, head_dim: int, device: str) -> torch.Tensor:
    """An empty full-precision window in fp32, shared (it holds nothing to write): a restore builds a cache per layer,
    and each tensor op costs it microseconds."""
    return torch.zeros(batch, heads, 0, head_dim, device=device)


class QuantizedKVCache(SingleOffset):
    """Packed low-bit K/V (8, 4 or 2 bits) behind the KVCache protocol, plus blockwise `attend`.

    Tokens [0, quantized) are held as codes; [quantized, offset) sit in a small full-precision window (empty for
    the "token" scheme unless `window` is set). `state()` returns both exactly as held.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, bits: int = 4, group: int = 64,
                 scheme: str = "token", window: int = 0, hadamard: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 block: int = ATTENTION_BLOCK) -> None:
        hg = head_group(group, head_dim)
        if bits not in BITS or scheme not in SCHEMES or window < 0:
            raise InvalidRequestError(f"unsupported KV cache: {bits}-bit, scheme {scheme!r}, window {window}")
        if head_dim % hg or hg % (8 // bits) or group % (8 // bits):
            raise InvalidRequestError(f"KV group {group} must divide head_dim {head_dim} and be a multiple of "
                                      f"{8 // bits} for {bits}-bit codes")
        if hadamard and head_dim & (head_dim - 1):
            raise InvalidRequestError(f"a Hadamard rotation needs a power-of-2 head_dim, got {head_dim}")
        per_channel = scheme == "kivi"
        self.kv_heads, self.head_dim, self.bits, self.group, self.scheme = kv_heads, head_dim, bits, group, scheme
        self.hadamard, self.dtype, self.window = hadamard, dtype, window
        self.unit = group if per_channel else 1  # tokens quantized together
        self.block = max(block // self.unit, 1) * self.unit
        self.keys = _PackedBuffer(batch, kv_heads, head_dim, bits, group if per_channel else hg, per_channel,
                                  capacity, device)
        self.values = _PackedBuffer(batch, kv_heads, head_dim, bits, hg, False, capacity, device)
        recent = (batch, kv_heads, window + self.unit - 1, head_dim)
        self.recent_keys = torch.empty(recent, dtype=dtype, device=device)  # only [:offset - quantized] is read
        self.recent_values = torch.empty(recent, dtype=dtype, device=device)
        self.offset = 0
        self.quantized = 0
        self._table: torch.Tensor | None = None  # the native kernel's page table, kept between decode steps
        self._none = _empty_window(batch, kv_heads, head_dim, str(device))

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.keys.data, self.keys.scales, self.keys.zeros, self.values.data, self.values.scales,
                self.values.zeros, self.recent_keys, self.recent_values)

    @property
    def nbytes(self) -> int:
        """Bytes reserved (codes, scales, zeros and the full-precision window)."""
        return sum(t.nbytes for t in self._buffers())

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append new K/V: quantize every whole unit older than the window, keep the rest in full precision."""
        keys = (hadamard(keys.float()) if self.hadamard else keys).to(self.dtype)
        values = values.to(self.dtype)
        held = self.offset - self.quantized
        n = keys.shape[2]
        if not self.recent_keys.shape[2]:  # no full-precision window: every token is quantized as it comes
            self.keys.write(self.quantized, keys)
            self.values.write(self.quantized, values)
            self.quantized += n
        elif held + n <= self.recent_keys.shape[2]:  # decode fast path: write in place, nothing to close yet
            self.recent_keys[:, :, held:held + n] = keys
            self.recent_values[:, :, held:held + n] = values
        else:
            if held:
                keys = torch.cat([self.recent_keys[:, :, :held], keys], 2)
                values = torch.cat([self.recent_values[:, :, :held], values], 2)
            close = (keys.shape[2] - self.window) // self.unit * self.unit
            self.keys.write(self.quantized, keys[:, :, :close])
            self.values.write(self.quantized, values[:, :, :close])
            self.quantized += close
            self.recent_keys[:, :, : keys.shape[2] - close] = keys[:, :, close:]
            self.recent_values[:, :, : keys.shape[2] - close] = values[:, :, close:]
        self.offset += n

    def _blocks(self, size: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first token, K, V) in fp32, `size` tokens (default: `block`) at a time, then the full-precision window."""
        size = self.block if size is None else max(size // self.unit, 1) * self.unit
        for start in range(0, self.quantized, size):
            end = min(start + size, self.quantized)
            yield start, self.keys.read(start, end), self.values.read(start, end)
        held = self.offset - self.quantized
        if held:
            yield (self.quantized, self.recent_keys[:, :, :held].float(), self.recent_values[:, :, :held].float())

    def _native(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(output fp32 (B, H, t, D), lse (B, H, t)) of q over everything held, by the native kernel; None where
        it does not apply."""
        b, n_heads, t, d = q.shape
        qf = q.float().reshape(b, self.kv_heads, n_heads // self.kv_heads * t, d)
        held = self.offset - self.quantized
        if self._table is None or self._table.shape[0] != b:
            self._table = torch.arange(b, device=q.device).unsqueeze(1)  # batch row b's tokens all in "page" b
        recent = (self.recent_keys[:, :, :held], self.recent_values[:, :, :held]) if held else (self._none, self._none)
        found = packed_attention(hadamard(qf) if self.hadamard else qf, self.keys.packed(), self.values.packed(),
                                 self.bits, self._table, self.keys.capacity, self.quantized, *recent, scale)
        return None if found is None else (found[0].view(b, n_heads, t, d), found[1].view(b, n_heads, t))

    def _past(self, q: torch.Tensor, mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, lse) of a prefill chunk's queries over the tokens held before it, exactly as held."""
        if mask is not None and bool(mask.all()):
            mask = None
        return span_attention(q, self._blocks(PREFILL_SPAN), mask, scale, self.hadamard)

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store, then return every token's K/V dequantized (materialises the cache; `attend` does not)."""
        self._store(keys, values)
        held = self.offset - self.quantized
        k = torch.cat([self.keys.read(0, self.quantized), self.recent_keys[:, :, :held].float()], 2)
        v = torch.cat([self.values.read(0, self.quantized), self.recent_values[:, :, :held].float()], 2)
        if self.hadamard:
            k = hadamard(k)
        return k.to(self.dtype), v.to(self.dtype)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Store `keys`/`values`, then softmax(q·Kᵀ·scale)·V over the whole cache, never all of it in float.

        q is (B, n_rep·kv_heads, t, D), positions offset..offset+t-1. `mask` is None (causal) or a boolean
        (t, all tokens) mask, True = attend. A decode step runs the native kernel over the packed codes (the
        blockwise PyTorch path where it does not apply); a prefill chunk (over STORED_CHUNK_MAX tokens) attends to
        its own K/V exactly, merged by log-sum-exp with its attention over the tokens held before it, and is
        quantized on store.
        """
        start, t = self.offset, q.shape[2]
        if t > STORED_CHUNK_MAX:
            past = self._past(q, None if mask is None else mask[:, :start], scale) if start else None
            self._store(keys, values)
            return prefill_attention(q, keys, values, mask, scale, past)
        self._store(keys, values)
        found = self._native(q, scale) if t == 1 and (mask is None or bool(mask.all())) else None
        if found is not None:
            return found[0].to(q.dtype)
        return blockwise_attention(q, self._blocks(), self.kv_heads, start, mask, scale, self.hadamard)

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens; cutting into a closed key group re-opens it into the window (dequantized)."""
        keep = max(0, self.offset - n)
        if keep < self.quantized:
            closed = keep // self.unit * self.unit
            reopened = keep - closed
            if reopened:  # per-channel keys dequantize a whole group at a time
                self.recent_keys[:, :, :reopened] = self.keys.read(closed, closed + self.unit)[:, :, :reopened]
                self.recent_values[:, :, :reopened] = self.values.read(closed, keep)
            self.quantized = closed
        self.offset = keep

    def state(self) -> dict[str, torch.Tensor]:
        """Packed codes and fp16 scales/zeros of the quantized tokens, plus the full-precision window if any."""
        state = self.keys.state(self.quantized, "keys") | self.values.state(self.quantized, "values")
        if self.recent_keys.shape[2]:
            held = self.offset - self.quantized
            state |= {"keys.window": self.recent_keys[:, :, :held], "values.window": self.recent_values[:, :, :held]}
        return state

    def receive(self, state: dict[str, torch.Tensor | Layout]) -> dict[str, torch.Tensor | BlockTarget]:
        quantized = self.keys.held_in(state, "keys")
        window = self.recent_keys.shape[2] > 0
        if state.keys() - (_WINDOWED_STATE if window else _PACKED_STATE):
            raise InvalidRequestError(f"saved state holds {sorted(state.keys() - _PACKED_STATE)}, which this "
                                      f"{'windowed' if window else 'window-less'} quantized cache does not hold")
        empty = self.recent_keys[:, :, :0]
        windows = state.get("keys.window", empty), state.get("values.window", empty)
        held = windows[0].shape[2]
        expected = (*self.recent_keys.shape[:2], held, self.head_dim)
        if self.values.held_in(state, "values") != quantized:
            raise InvalidRequestError("saved keys and values hold different token counts")
        if held > self.recent_keys.shape[2] or any(tuple(w.shape) != expected or w.dtype != self.dtype
                                                   for w in windows):
            raise InvalidRequestError(f"saved full-precision window {tuple(windows[0].shape)} "
                                      f"{windows[0].dtype} does not fit this cache ({self.dtype})")
        return self._take(quantized, held, window and "keys.window" in state)

    def _take(self, quantized: int, held: int, windowed: bool) -> dict[str, torch.Tensor | BlockTarget]:
        """Hold `quantized` coded tokens and `held` in the window (checked already); where a state's bytes go."""
        pieces = self.keys.receive("keys", quantized) | self.values.receive("values", quantized)
        if windowed:
            pieces |= {"keys.window": rows_of(self.recent_keys, held),
                       "values.window": rows_of(self.recent_values, held)}
        self.quantized, self.offset = quantized, quantized + held
        return pieces

    def _layout(self) -> tuple:
        """What decides how a state fits: the format and every buffer's shape."""
        return (self.bits, self.group, self.scheme, self.window, self.hadamard, self.dtype,
                *(t.shape for t in self._buffers()))

    @staticmethod
    def receive_all(caches: list[QuantizedKVCache], states: list[dict[str, torch.Tensor | Layout]]
                    ) -> list[dict[str, torch.Tensor | BlockTarget]]:
        """`receive` for every layer of a model at once. Where a layer has the first one's format and buffers and
        its state the first one's layout (a restore's common case), the first layer's checks stand for it: a
        restore right after a decode step paid ~25 us a layer for them."""
        if len(states) != len(caches):
            raise InvalidRequestError(f"{len(states)} saved layers for {len(caches)} caches")
        if not caches:
            return []
        first = caches[0]
        out = [first.receive(states[0])]
        layout, windowed = first._layout(), "keys.window" in out[0]
        for cache, state in zip(caches[1:], states[1:], strict=True):
            if type(cache) is QuantizedKVCache and state == states[0] and cache._layout() == layout:
                out.append(cache._take(first.quantized, first.offset - first.quantized, windowed))
            else:
                out.append(cache.receive(state))
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the contents with a `state()` of a cache of the same format: bit-exact, all or nothing."""
        load_state(self, state)


"""Native attention over packed KV caches against the PyTorch references: blockwise attention over dequantized
blocks, and plain fp32 SDPA over the dequantized cache; every bit width, scheme, Hadamard, GQA ratio, odd length."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from edgellm.kernels import kvattn
from edgellm.kv import KVFormat, QuantizedKVCache, hadamard
from edgellm.kv.pool import BlockPool
from edgellm.kv.quantized_cache import blockwise_attention

D = 64
SCALE = D**-0.5


@pytest.fixture(scope="module", autouse=True)
def ext():
    if not kvattn.kvattn_available():
        pytest.skip("native kernel unavailable (no compiler or ninja, or EDGELLM_NO_NATIVE=1)")


def filled(bits: int, scheme: str, rotate: bool, tokens: int, batch: int = 2, kv_heads: int = 2, head_dim: int = D,
           group: int = 32, window: int | None = None, seed: int = 0) -> QuantizedKVCache:
    """A cache holding `tokens` random tokens (outliers in a few channels, as real keys have)."""
    window = (16 if scheme == "kivi" else 0) if window is None else window
    cache = QuantizedKVCache(batch, kv_heads, head_dim, 8, bits, group, scheme, window, rotate)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, tokens, head_dim, generator=g)
    k[..., :3] *= 8
    cache.update_and_fetch(k, torch.randn(batch, kv_heads, tokens, head_dim, generator=g))
    return cache


def references(cache: QuantizedKVCache, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(blockwise attention, fp32 SDPA, log-sum-exp) of q at the last position over the cache as held."""
    blockwise = blockwise_attention(q, cache._blocks(), cache.kv_heads, cache.offset - 1, None, SCALE, cache.hadamard)
    k, v = cache.update_and_fetch(q.new_zeros(q.shape[0], cache.kv_heads, 0, q.shape[3]),
                                  q.new_zeros(q.shape[0], cache.kv_heads, 0, q.shape[3]))
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)
    lse = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(2, 3) * SCALE).logsumexp(-1)
    return blockwise, sdpa, lse


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def decode(cache: QuantizedKVCache, rep: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step through `attend` (the new token stored first), and q for the references."""
    g = torch.Generator().manual_seed(seed)
    b, h = cache.recent_keys.shape[:2]
    q = 3 * torch.randn(b, h * rep, 1, cache.head_dim, generator=g)
    out = cache.attend(q, torch.randn(b, h, 1, cache.head_dim, generator=g),
                       torch.randn(b, h, 1, cache.head_dim, generator=g), None, SCALE)
    return q, out


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("scheme", ["token", "kivi"])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("rep", [1, 4])
@pytest.mark.parametrize("tokens", [0, 76, 300])  # held before the step: none, and not multiples of group or tile
def test_decode_matches_blockwise_and_sdpa(bits, scheme, rotate, rep, tokens):
    cache = filled(bits, scheme, rotate, tokens)
    q, out = decode(cache, rep)
    found = cache._native(q, SCALE)
    assert found is not None  # the kernel ran, not the fallback
    assert torch.equal(out, found[0])
    blockwise, sdpa, lse = references(cache, q)
    close(out, blockwise)
    close(out, sdpa)
    close(found[1], lse)


@pytest.mark.parametrize("fmt,head_dim", [("q4-g8", 64), ("q2-g4", 32), ("q8-g8", 24), ("q4-g16-w5", 48),
                                           ("q4-kivi-g8-w3", 24), ("q2-kivi-g128", 64), ("q8-kivi-h-g32-w0", 128)])
@pytest.mark.parametrize("tokens", [1, 131])
def test_groups_and_head_dims_off_the_vector_path(fmt, head_dim, tokens):
    """Groups under 16 lanes, head dims not a multiple of 16, token-scheme windows, KIVI groups of any size."""
    f = KVFormat.parse(fmt)
    cache = filled(int(f.kind[1:]), f.scheme, f.hadamard, tokens, batch=3, head_dim=head_dim, group=f.group,
                   window=f.window)
    q, out = decode(cache, 2)
    blockwise, sdpa, _ = references(cache, q)
    close(out, blockwise)
    close(out, sdpa)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("scheme,group", [("token", 64), ("kivi", 64), ("kivi", 4)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rep", [1, 2, 3, 4, 5, 7, 8])
def test_keys_scored_from_their_codes_for_every_row_count(bits, scheme, group, head_dim, rep):
    """Keys are scored four tokens and up to four query rows at a time straight from the codes (5 and 7 rows: a
    block of four, then the rest); 131 per-token keys leave a tail of 3 after the last whole four, and a KIVI group
    of 4 tokens at 8 bits spans four byte rows."""
    cache = filled(bits, scheme, False, 130, batch=1, head_dim=head_dim, group=group)
    q, out = decode(cache, rep)
    blockwise, sdpa, lse = references(cache, q)
    # with head_dim 128 under SCALE = 64 ** -0.5 the scores are sharp: the two fp32 references then differ by up
    # to ~1.3e-5 themselves, and the kernel must be as close to each as twice that
    tol = max(1e-5, 2 * float((blockwise - sdpa).abs().max()))
    torch.testing.assert_close(out, blockwise, rtol=1e-5, atol=tol)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=tol)
    close(cache._native(q, SCALE)[1], lse)


@pytest.mark.parametrize("scheme", ["token", "kivi"])
@pytest.mark.parametrize("part", ["keys.scales", "keys.zeros", "values.scales", "values.zeros", "keys.data"])
def test_a_wrong_scale_zero_or_code_is_caught(scheme, part):
    """Corrupting one stored number moves the kernel's output with the reference's: every part is really read."""
    cache = filled(4, scheme, False, 200)
    q = 3 * torch.randn(2, 8, 1, D, generator=torch.Generator().manual_seed(5))
    before = cache._native(q, SCALE)[0]
    side, name = part.split(".")
    field = getattr(getattr(cache, side), name)
    if name == "data":
        field[1, 1, 7:40] ^= 0xFF
    else:
        field[1, 1, 2:40] = field[1, 1, 2:40].float().mul(3).add(0.5).half()
    after = cache._native(q, SCALE)[0]
    assert not torch.allclose(after[1], before[1], rtol=1e-3, atol=1e-3)
    # tripled key scales sharpen the scores (|score| ~ 50): fp32 rounding of them alone reaches ~1e-5
    torch.testing.assert_close(after, references(cache, q)[0], rtol=1e-4, atol=1e-4)


def test_gqa_heads_read_their_own_kv_head():
    """Swapping the two KV heads' codes swaps exactly the outputs of the query heads on them."""
    cache = filled(4, "token", False, 90, batch=1)
    q = torch.randn(1, 1, 1, D).expand(1, 8, 1, D)  # the same query on every head
    before = cache._native(q, SCALE)[0]
    for t in (cache.keys.data, cache.keys.scales, cache.keys.zeros, cache.values.data, cache.values.scales,
              cache.values.zeros):
        t.copy_(t.flip(1))
    after = cache._native(q, SCALE)[0]
    close(after[:, :4], before[:, 4:])
    close(after[:, 4:], before[:, :4])


def test_fallback_where_the_kernel_does_not_apply():
    cache = filled(4, "token", False, 40)
    q = torch.randn(2, 2, kvattn.NATIVE_MAX_ROWS + 1, D)
    none = q[:, :, :0]
    args = (cache.keys.packed(), cache.values.packed(), 4, torch.arange(2).unsqueeze(1), cache.keys.capacity, 40,
            none, none, SCALE)
    assert kvattn.packed_attention(q, *args) is None
    assert kvattn.packed_attention(q[:, :, :3].clone().requires_grad_(), *args) is None
    assert kvattn.packed_attention(q[:, :, :3], *args) is not None


@pytest.mark.parametrize("fmt", ["q4", "q2-h", "q8-kivi-h", "q4-kivi"])
@pytest.mark.parametrize("windowed", [False, True])
def test_prefill_chunk_sees_its_own_kv_exactly_and_the_past_as_held(fmt, windowed):
    """Prefill chunks (past STORED_CHUNK_MAX tokens: flash over dequantized spans), with a sliding window mask
    too: equal to SDPA over [past as held, the chunk's exact K/V]."""
    f = KVFormat.parse(fmt)
    cache = filled(int(f.kind[1:]), f.scheme, f.hadamard, 150, batch=1, group=f.group)
    g = torch.Generator().manual_seed(3)
    for t in (70, 100):
        start = cache.offset
        past_k, past_v = cache.update_and_fetch(torch.zeros(1, 2, 0, D), torch.zeros(1, 2, 0, D))
        q, k, v = torch.randn(1, 4, t, D, generator=g), torch.randn(1, 2, t, D, generator=g), \
            torch.randn(1, 2, t, D, generator=g)
        pos = torch.arange(start, start + t).unsqueeze(1)
        mask = torch.arange(start + t) <= pos
        if windowed:
            mask &= pos - torch.arange(start + t) < 120
        out = cache.attend(q, k, v, mask if windowed or start else None, SCALE)
        ref = F.scaled_dot_product_attention(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2), attn_mask=mask,
                                             scale=SCALE, enable_gqa=True)
        close(out, ref)


@pytest.mark.parametrize("fmt", ["q4", "q2-h", "q8"])
def test_paged_decode_matches_contiguous(fmt):
    """Two sequences in one pool (blocks of 48 tokens, interleaved): each decodes as its contiguous twin does."""
    f = KVFormat.parse(fmt)
    pool = BlockPool(SimpleNamespace(num_key_value_heads=2, head_dim=D), f, 1 << 22, 48)
    caches = [pool.make_caches(1)[0] for _ in range(2)]
    twins = [QuantizedKVCache(1, 2, D, 8, int(f.kind[1:]), f.group, hadamard=f.hadamard) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    for n in (30, 50, 70, 1, 1):  # the two sequences take turns, so their blocks interleave in the pool
        for cache, twin in zip(caches, twins, strict=True):
            k, v = torch.randn(1, 2, n, D, generator=g), torch.randn(1, 2, n, D, generator=g)
            cache.update_and_fetch(k, v)
            twin.update_and_fetch(k, v)
    for cache, twin in zip(caches, twins, strict=True):
        q, k, v = torch.randn(1, 8, 1, D, generator=g), torch.randn(1, 2, 1, D, generator=g), \
            torch.randn(1, 2, 1, D, generator=g)
        out = cache.attend(q, k, v, None, SCALE)
        assert cache._native(q.reshape(1, 2, 4, D), cache.offset, SCALE) is not None
        assert torch.equal(out, twin.attend(q, k, v, None, SCALE))
        close(out, blockwise_attention(q, cache._blocks(), 2, cache.offset - 1, None, SCALE, f.hadamard))


@pytest.mark.parametrize("fmt", ["q4", "q2-h", "q8"])
@pytest.mark.parametrize("t", [5, 20])
def test_paged_short_chunk_attends_over_the_stored_cache(fmt, t):
    """A short chunk (a speculative check, a warm turn's few new tokens) sees every token as stored, its own
    causally: the native pass over the past (more than NATIVE_MAX_ROWS query rows at t=20: split) merged with its
    own rows equals the block-by-block reference over the stored blocks."""
    f = KVFormat.parse(fmt)
    pool = BlockPool(SimpleNamespace(num_key_value_heads=2, head_dim=D), f, 1 << 22, 48)
    cache = pool.make_caches(1)[0]
    g = torch.Generator().manual_seed(1)
    cache.update_and_fetch(torch.randn(1, 2, 100, D, generator=g), torch.randn(1, 2, 100, D, generator=g))
    q, k, v = (torch.randn(1, h, t, D, generator=g) for h in (8, 2, 2))
    out = cache.attend(q, k, v, None, SCALE)
    close(out, blockwise_attention(q, cache._blocks(), 2, 100, None, SCALE, f.hadamard))


def test_hadamard_rotates_the_query_not_the_keys():
    """With rotated keys, the kernel's output equals SDPA of the unrotated query over the unrotated keys."""
    cache = filled(8, "token", True, 64, batch=1)
    q = torch.randn(1, 4, 1, D)
    out = cache._native(q, SCALE)[0]
    k, v = cache.update_and_fetch(torch.zeros(1, 2, 0, D), torch.zeros(1, 2, 0, D))
    close(out, F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True))
    rotated_keys = hadamard(k)  # what the cache holds: attending to them with the plain query is another answer
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, rotated_keys, v, scale=SCALE, enable_gqa=True),
                              atol=1e-3)

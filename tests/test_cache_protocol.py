"""Every cache kind implements the declared protocol, and `trim` rolls any of them back to an earlier state."""

from __future__ import annotations

import pytest
import torch

from edgellm.kv import AttentionCache, BlockPool, DenseKVCache, KVCache, KVFormat, QuantizedKVCache, SequenceBatch

HEADS, KV_HEADS, DIM = 4, 2, 32


class Shape:
    num_hidden_layers, num_key_value_heads, head_dim = 1, KV_HEADS, DIM


def make(kind: str) -> KVCache:
    if kind == "dense":
        return DenseKVCache(1, KV_HEADS, DIM, 16, torch.float32)
    if kind in ("q8", "q4-kivi"):
        fmt = KVFormat.parse(kind)
        return QuantizedKVCache(1, KV_HEADS, DIM, 16, int(kind[1]), fmt.group, fmt.scheme, fmt.window, fmt.hadamard,
                                torch.float32)
    fmt = KVFormat.parse(kind.removeprefix("paged-"))
    pool = BlockPool(Shape(), fmt, 1 << 22, block_tokens=16, dtype=torch.float32)
    return pool.make_caches(1)[0]


KINDS = ["dense", "q8", "q4-kivi", "paged-fp32", "paged-q4"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_implements_the_protocol(kind):
    cache = make(kind)
    assert isinstance(cache, KVCache) and isinstance(cache, AttentionCache)
    assert cache.offsets == [0] and cache.nbytes >= 0
    assert isinstance(SequenceBatch([cache, make(kind)]), AttentionCache)


@pytest.mark.parametrize("kind", KINDS)
def test_trim_rolls_back_to_the_earlier_cache(kind):
    """Write 30 tokens, then 12 more, trim the 12: attention of a new token equals a cache that never saw them."""
    gen = torch.Generator().manual_seed(0)

    def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(1, KV_HEADS, n, DIM, generator=gen), torch.randn(1, KV_HEADS, n, DIM, generator=gen))

    first, extra, new = kv(30), kv(12), kv(1)
    q = torch.randn(1, HEADS, 1, DIM, generator=gen)
    rolled, plain = make(kind), make(kind)
    rolled.attend(torch.zeros(1, HEADS, 30, DIM), *first, None, DIM**-0.5)
    rolled.attend(torch.zeros(1, HEADS, 12, DIM), *extra, None, DIM**-0.5)
    rolled.trim(12)
    assert rolled.offset == rolled.offsets[0] == 30
    plain.attend(torch.zeros(1, HEADS, 30, DIM), *first, None, DIM**-0.5)
    got = rolled.attend(q, *new, None, DIM**-0.5)
    want = plain.attend(q, *new, None, DIM**-0.5)
    # a quantized cache may re-open a closed group when trimmed: its tokens then come back dequantized
    tol = 0 if kind in ("dense", "paged-fp32") else 0.05
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert rolled.offset == 31

"""Quantized KV caches: packing vs a slow reference, exact state round trips, blockwise attention, model quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgellm import load
from edgellm.bench.memory import measure_peak_bytes
from edgellm.errors import InvalidRequestError
from edgellm.kv import KVFormat, QuantizedKVCache, dequantize, hadamard, make_caches, quantize
from edgellm.kv.codec import unpack
from edgellm.kv.quantized_cache import STORED_CHUNK_MAX

QUANT_FORMATS = [f"{kind}{opts}" for kind in ("q8", "q4", "q2") for opts in ("", "-h", "-kivi", "-kivi-h")]


def reference_quantize(x: torch.Tensor, bits: int, group: int) -> tuple[list[int], list[int], np.ndarray]:
    """Slow and obvious, one group at a time along the last dim: zero = min rounded down to fp16,
    scale = (max - zero) / (2^bits - 1) rounded up to fp16, code = round((x - zero) / scale).
    Returns the codes, the packed bytes (lowest bits first) and the dequantized values."""
    flat, levels = x.reshape(-1, group).float().numpy(), 2**bits - 1
    codes, values = [], []
    for row in flat:
        zero = np.float16(row.min())
        if float(zero) > row.min():
            zero = np.nextafter(zero, np.float16(-np.inf))
        ideal = (row.max() - np.float32(zero)) / np.float32(levels)
        scale = np.float16(ideal)
        if float(scale) < ideal:
            scale = np.nextafter(scale, np.float16(np.inf))
        for v in row:
            c = 0 if scale == 0 else int(np.clip(np.round((v - np.float32(zero)) / np.float32(scale)), 0, levels))
            codes.append(c)
            values.append(np.float32(c) * np.float32(scale) + np.float32(zero))
    per = 8 // bits
    packed = [sum(c << (bits * j) for j, c in enumerate(codes[i:i + per])) for i in range(0, len(codes), per)]
    return codes, packed, np.array(values, dtype=np.float32).reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [-1, 2])
def test_quantize_matches_reference(bits, dim):
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 0, :, :] = 1.5  # a constant group: zero range
    q = quantize(x, bits, 16 if dim == -1 else 8, dim)
    last = x.movedim(dim, -1)
    codes, packed, ref = reference_quantize(last, bits, q.group)
    data = q.data.movedim(dim, -1)
    assert q.data.dtype == torch.uint8 and q.scales.dtype == q.zeros.dtype == torch.float16
    assert data.shape[-1] == last.shape[-1] * bits // 8
    assert unpack(data, bits).flatten().tolist() == codes
    assert data.flatten().tolist() == packed
    out = dequantize(q)
    assert torch.equal(out, torch.from_numpy(ref).movedim(-1, dim))
    step = q.scales.float().movedim(dim, -1).repeat_interleave(q.group, -1).movedim(-1, dim)
    assert ((out - x).abs() <= step / 2 + 1e-6 * x.abs()).all()


def test_hadamard_is_orthogonal_and_its_own_inverse():
    x, y = torch.randn(5, 64), torch.randn(5, 64)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)
    assert torch.allclose((hadamard(x) * hadamard(y)).sum(-1), (x * y).sum(-1), atol=1e-4)


def cache_for(fmt: str, kv_heads: int = 2, head_dim: int = 64, batch: int = 1, capacity: int = 8,
              dtype: torch.dtype = torch.float32) -> QuantizedKVCache:
    f = KVFormat.parse(fmt)
    return QuantizedKVCache(batch, kv_heads, head_dim, capacity, int(f.kind[1:]), f.group, f.scheme, f.window,
                            f.hadamard, dtype, block=32)


def feed(cache, chunks, kv_heads=2, head_dim=64, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    for t in chunks:
        cache.update_and_fetch(torch.randn(batch, kv_heads, t, head_dim, generator=g),
                               torch.randn(batch, kv_heads, t, head_dim, generator=g))


@pytest.mark.parametrize("fmt", [*QUANT_FORMATS, "q4-kivi-g16-w0", "q4-g32-w8"])
def test_state_round_trip_is_bit_identical(fmt):
    cache = cache_for(fmt, batch=2)
    feed(cache, [45, 1, 1, 90, 1], batch=2)
    state = cache.state()
    assert all(t.shape[2] > 0 for name, t in state.items() if not name.endswith("window"))
    restored = cache_for(fmt, batch=2)
    restored.load_state({k: v.clone() for k, v in state.items()})
    assert restored.offset == cache.offset == 138
    again = restored.state()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) and state[k].dtype == again[k].dtype for k in state)
    feed(cache, [3, 70], batch=2, seed=1)  # both keep going identically
    feed(restored, [3, 70], batch=2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(cache.state().values(), restored.state().values(), strict=True))


def test_load_state_of_another_format_is_refused_whole():
    q4, q8 = cache_for("q4-kivi"), cache_for("q8-kivi")
    feed(q4, [100])
    feed(q8, [10])
    with pytest.raises(InvalidRequestError, match="do not match"):
        q8.load_state(q4.state())
    with pytest.raises(InvalidRequestError, match="not from a quantized cache"):
        q8.load_state({"keys": torch.zeros(1, 2, 5, 64), "values": torch.zeros(1, 2, 5, 64)})
    assert q8.offset == 10


def dense_attention(q, k, v, start, mask=None):
    t = q.shape[2]
    if mask is None:
        mask = torch.arange(k.shape[2]) <= torch.arange(start, start + t).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def expected_attention(cache, q, k, v, start, mask=None):
    """What `attend` computes, from a twin `cache`: a decode step or a short chunk sees every token as stored; a
    prefill chunk (over STORED_CHUNK_MAX tokens) sees the tokens held before it as stored and its own K/V exactly
    (it attends before quantizing them)."""
    if q.shape[2] <= STORED_CHUNK_MAX:
        return dense_attention(q, *(x.to(q.dtype) for x in cache.update_and_fetch(k, v)), start, mask)
    past_k, past_v = cache.update_and_fetch(k[:, :, :0], v[:, :, :0])
    cache.update_and_fetch(k, v)
    return dense_attention(q, torch.cat([past_k.to(q.dtype), k], 2), torch.cat([past_v.to(q.dtype), v], 2), start, mask)


@pytest.mark.parametrize("fmt", ["q4", "q4-h", "q2-kivi", "q8-kivi-h", "q4-kivi-g16-w16"])
def test_attend_equals_dense_attention_over_dequantized_cache(fmt):
    """Prefill chunk, decode steps and a chunk at an offset, GQA (4 query heads on 2 KV heads), batch 2."""
    a, b = cache_for(fmt, batch=2), cache_for(fmt, batch=2)
    g = torch.Generator().manual_seed(0)
    for t in (37, 1, 1, 100, 1, 70, 1, 5):
        q = torch.randn(2, 4, t, 64, generator=g)
        k, v = torch.randn(2, 2, t, 64, generator=g), torch.randn(2, 2, t, 64, generator=g)
        start = a.offset
        out = a.attend(q, k, v, None, 64**-0.5)
        ref = expected_attention(b, q, k, v, start)
        assert (out - ref).abs().max() <= 1e-5


def test_attend_in_bf16_matches_fp32_reference():
    a, b = cache_for("q4-kivi-h", dtype=torch.bfloat16), cache_for("q4-kivi-h", dtype=torch.bfloat16)
    feed(a, [150])
    feed(b, [150])
    q, k, v = (torch.randn(1, h, 3, 64).bfloat16() for h in (4, 2, 2))
    out = a.attend(q, k, v, None, 64**-0.5)
    ref = expected_attention(b, q.float(), k.float(), v.float(), 150)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() <= 2e-2


def test_attend_with_an_explicit_window_mask_and_after_trim():
    a, b = cache_for("q4-kivi-g16-w16"), cache_for("q4-kivi-g16-w16")
    feed(a, [90])
    feed(b, [90])
    a.trim(27)  # cuts into a closed key group: it is re-opened into the window
    b.trim(27)
    assert a.offset == 63 and a.quantized == 48
    q, k, v = torch.randn(1, 4, 5, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    pos = torch.arange(63, 68).unsqueeze(1)
    mask = (torch.arange(68) <= pos) & (pos - torch.arange(68) < 20)
    out = a.attend(q, k, v, mask, 64**-0.5)
    assert (out - expected_attention(b, q, k, v, 63, mask)).abs().max() <= 1e-5


def test_blockwise_attention_peaks_below_materialising():
    """Decode over 4096 Q4 tokens: `attend` holds one block in float, `update_and_fetch` all of it."""
    a, b = cache_for("q4", kv_heads=4, capacity=4100), cache_for("q4", kv_heads=4, capacity=4100)
    feed(a, [4095], kv_heads=4)
    feed(b, [4095], kv_heads=4)
    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64)
    blockwise = measure_peak_bytes(lambda: a.attend(q, k, v, None, 0.125))
    materialised = measure_peak_bytes(lambda: dense_attention(q, *b.update_and_fetch(k, v), 4095))
    fp16_cache = 2 * 4 * 4096 * 64 * 2
    assert blockwise < fp16_cache / 4 < materialised


def test_format_names_metadata_and_bytes():
    f = KVFormat.parse("Q4-KIVI-H")
    assert (f.kind, f.scheme, f.group, f.window, f.hadamard) == ("q4", "kivi", 64, 64, True)
    assert str(f) == "q4-kivi-h" and KVFormat.parse(str(f)) == f
    assert KVFormat.parse("q2-g32-w8") == KVFormat("q2", "token", 32, 8)
    assert KVFormat.from_metadata(f.to_metadata()) == f
    assert all(isinstance(v, str) for v in f.to_metadata().values())
    for bad in ("q3", "q4-foo", "fp16-kivi", "q4-g0", "", "q4-kivi-gx"):
        with pytest.raises(InvalidRequestError) as e:
            KVFormat.parse(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(InvalidRequestError):
        KVFormat.from_metadata({"kv_kind": "q4"})

    class Args:
        num_hidden_layers, num_key_value_heads, head_dim = 3, 2, 64

    assert KVFormat.parse("fp16").bytes_per_token(Args) == 3 * 2 * 2 * 64 * 2
    assert KVFormat.parse("q4").bytes_per_token(Args) == 3 * 2 * 2 * (32 + 4)
    for fmt in ("q8", "q4-g32", "q2-kivi-w0", "q4-kivi-g128-w0-h"):
        cache = cache_for(fmt)
        feed(cache, [256])
        held = sum(t.nbytes for t in cache.state().values())
        assert held == 256 * KVFormat.parse(fmt).bytes_per_token(Args) / 3


def next_logits(model, caches, prompt, steps):
    """Greedy tokens and each step's logits, feeding the prompt in chunks of 16 (chunks at an offset)."""
    for start in range(0, prompt.shape[1], 16):
        logits = model(prompt[:, start:start + 16], caches, last_only=True)[0, -1]
    tokens, all_logits = [], []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        all_logits.append(logits)
        logits = model(torch.tensor([[tokens[-1]]]), caches, last_only=True)[0, -1]
    return tokens, torch.stack(all_logits)


def test_model_generates_with_quantized_caches(checkpoint):
    model, _ = load(checkpoint("llama", max_position_embeddings=512), "fp32")
    prompt = torch.randint(0, 300, (1, 96), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_tokens, ref = next_logits(model, model.make_cache(8), prompt, 8)
        fp16_tokens, fp16 = next_logits(model, model.make_cache(8, kv_format=KVFormat.parse("fp16")), prompt, 8)
        assert fp16_tokens == ref_tokens and (fp16 - ref).abs().max() < 1e-3
        errors = {}
        for fmt in ("q8", "q4", "q2", "q8-kivi-g16-w16", "q4-kivi-g16-w16", "q2-kivi-g16-w16"):
            caches = make_caches(model, KVFormat.parse(fmt), 8)
            assert all(isinstance(c, QuantizedKVCache) for c in caches)
            tokens, logits = next_logits(model, caches, prompt, 8)
            errors[fmt] = (logits - ref).abs().max().item()
            if fmt.startswith("q8"):
                assert tokens == ref_tokens
    scale = ref.abs().max().item()
    for scheme in ("", "-kivi-g16-w16"):
        q8, q4, q2 = (errors[f"q{b}{scheme}"] for b in (8, 4, 2))
        assert q8 < 0.01 * scale and q8 < q4 < q2 < 0.5 * scale

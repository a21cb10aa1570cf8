"""The fused native decode step over quantized KV caches against the op-at-a-time path (QuantizedKVCache.attend,
itself checked against the PyTorch references in test_kvattn and test_kv_quant): every bit width and scheme,
Hadamard keys, a full-precision window, GQA, MoE, a bf16 model; teacher-forced past a KIVI key group's closing.

The two paths compute K/V with different summation orders, so their caches can differ by a code where a value sits
on a rounding boundary; what the step stores is checked exactly by replaying the K/V rows it stored (its `tap`)
through the cache's own store, step by step: the codes, scales, zeros and window must come out bit for bit."""

from __future__ import annotations

import pytest
import torch

from edgellm.kv import KVFormat, QuantizedKVCache
from edgellm.loader import load
from edgellm.models import fused
from tests.test_fused_step import moe_checkpoint  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(fused.load_extension("step") is None, reason="native step not built")

PROMPT, STEPS = 6, 40
# head_dim 64 (the kernels' common shape, split-nibble 4-bit codes), 4 query heads on 2 KV heads
SHAPE = {"hidden_size": 256, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
# q8, q4, q2 x per-token (groups of 64 or 32), Hadamard, KIVI (key groups of 16 tokens, a 16-token window: one
# closes every 16 steps) with and without Hadamard, and a per-token scheme with an 8-token window
FORMATS = [f"{bits}{scheme}" for bits in ("q8", "q4", "q2")
           for scheme in ("", "-g32", "-h", "-kivi-g16-w16", "-kivi-h-g16-w16", "-w8")]


def run(model, fmt: str, ids: torch.Tensor, use_fused: bool, capacity: int = 8, replay: bool = False,
        decode_threads: int | None = None):
    """Teacher-forced logits after a one-chunk prompt, the decode steps that ran op at a time, and the caches.

    With `replay`, each fused step's stored K/V go through a copy of the caches as they were before the step, by the
    cache's own store, and must leave the same tensors. `decode_threads`: the thread count of the decode steps (the
    prompt runs at the current one)."""
    cache = model.make_cache(capacity, kv_format=KVFormat.parse(fmt))
    kvd = model.args.num_key_value_heads * model.args.head_dim
    out, op_steps = [], 0
    attend = QuantizedKVCache.attend

    def counted(self, *args, **kwargs):
        nonlocal op_steps
        op_steps += self is cache[0] and self.offset >= PROMPT
        return attend(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setenv("EDGELLM_FUSED_STEP", "1" if use_fused else "0")
        mp.setattr(QuantizedKVCache, "attend", counted)
        model(ids[:, :PROMPT], cache)
        if decode_threads is not None:
            torch.set_num_threads(decode_threads)
        for i in range(PROMPT, ids.shape[1]):
            token = ids[:, i:i + 1]
            if not replay:
                out.append(model(token, cache)[0, -1].float())
                continue
            before = [{k: v.clone() for k, v in c.state().items()} for c in cache]
            tap = torch.empty(len(cache), 2, kvd)
            logits = fused.decode_step(model, token, cache, tap)
            if logits is None:
                logits = model(token, cache)
            else:
                assert_replays(cache, before, tap, fmt)
            out.append(logits[0, -1].float())
    assert cache[0].offset == ids.shape[1]
    return torch.stack(out), op_steps, cache


def assert_replays(cache: list, before: list, tap: torch.Tensor, fmt: str) -> None:
    """The caches after a fused step hold exactly what the cache's store makes of the rows the step stored."""
    args = cache[0]
    for layer, (c, state) in enumerate(zip(cache, before, strict=True)):
        ref = QuantizedKVCache(1, args.kv_heads, args.head_dim, 1, args.bits, args.group, args.scheme, args.window,
                               args.hadamard, args.dtype)
        ref.load_state(state)
        k, v = (tap[layer, j].view(1, args.kv_heads, 1, args.head_dim) for j in range(2))
        ref._store(k, v)
        assert (ref.offset, ref.quantized) == (c.offset, c.quantized)
        got, want = c.state(), ref.state()
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"{fmt} layer {layer} {name} differs at offset {c.offset}"


def tokens(model, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.args.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))


def flushes(fmt: str) -> int:
    """Decode steps that close a KIVI key group (op at a time): the window (16 + 15 tokens) full before the token."""
    if "kivi" not in fmt:
        return 0
    held, closed = PROMPT, 0
    for _ in range(STEPS):
        if held == 31:
            held -= 16
            closed += 1
        held += 1
    return closed


def assert_matches_op_path(model, fmt: str, seed: int = 0, atol: float = 1e-4) -> None:
    ids = tokens(model, seed)
    ref, ref_op, _ = run(model, fmt, ids, use_fused=False)
    assert ref_op == STEPS
    got, op_steps, _ = run(model, fmt, ids, use_fused=True)
    assert isinstance(model.__dict__.get("_fused"), fused.FusedStep)
    assert op_steps == flushes(fmt)  # every other step ran in the plan
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    from tests.conftest import build_checkpoint

    model, _ = load(build_checkpoint(tmp_path_factory.mktemp("gqa"), "llama", **SHAPE), dtype="fp32")
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_op_path(gqa_model, fmt):
    assert_matches_op_path(gqa_model, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stores_what_the_cache_stores(gqa_model, fmt):
    got, _, cache = run(gqa_model, fmt, tokens(gqa_model, seed=1), use_fused=True, replay=True)
    assert cache[0].quantized > 0 and torch.isfinite(got).all()


@pytest.mark.parametrize("fmt", ["q4", "q4-kivi-h-g16-w16", "q4-h-w8"])
def test_bf16_model_rounds_what_it_stores(checkpoint, fmt):
    """A bf16 model's window holds bf16 and its codes quantize bf16-rounded K/V, as the cache's store does; the
    logits follow the op path on the same weights upcast (the step computes in fp32)."""
    model, _ = load(checkpoint("llama", **SHAPE), dtype="bf16")
    ids = tokens(model, seed=2)
    got, _, cache = run(model, fmt, ids, use_fused=True, replay=True)
    assert cache[0].recent_keys.dtype == torch.bfloat16
    ref, _, _ = run(model.float(), fmt, ids, use_fused=False)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {"num_key_value_heads": 4}),  # no GQA
    ("llama", {"num_key_value_heads": 1}),  # every query head on one KV head
    ("qwen3", {}),  # q/k norms, head_dim 32
])
@pytest.mark.parametrize("fmt", ["q4", "q4-kivi-h-g16-w16"])
def test_head_layouts(checkpoint, arch, overrides, fmt):
    model, _ = load(checkpoint(arch, **{**SHAPE, **overrides}), dtype="fp32")
    assert_matches_op_path(model, fmt)


@pytest.mark.parametrize("fmt", ["q4", "q8-kivi-g16-w16"])
def test_moe(moe_checkpoint, fmt):  # noqa: F811 (the fixture)
    model, _ = load(moe_checkpoint("qwen2_moe", **SHAPE, num_experts=4), dtype="fp32")
    assert_matches_op_path(model, fmt)


def test_two_threads_give_the_same_bits(gqa_model):
    """Each KV head's attention is computed whole by one thread: the same bits at any thread count. The prompt runs
    at one thread both times: PyTorch's own fp32 GEMM (MKL on a Zen 4 core) need not give the same bits at two."""
    ids = tokens(gqa_model)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _, _ = run(gqa_model, "q4-kivi-g16-w16", ids, use_fused=True, decode_threads=1)
        torch.set_num_threads(1)
        two, _, _ = run(gqa_model, "q4-kivi-g16-w16", ids, use_fused=True, decode_threads=2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_what_it_does_not_cover_runs_op_at_a_time(gqa_model):
    """A batch of two, caches in different formats, and a step closing a KIVI key group fall back."""
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        batch = gqa_model.make_cache(8, batch=2, kv_format=KVFormat.parse("q4"))
        assert fused.decode_step(gqa_model, token, batch) is None
        mixed = gqa_model.make_cache(8, kv_format=KVFormat.parse("q4"))
        mixed[1] = gqa_model.make_cache(8, kv_format=KVFormat.parse("q8"))[1]
        assert fused.decode_step(gqa_model, token, mixed) is None
        kivi = gqa_model.make_cache(8, kv_format=KVFormat.parse("q4-kivi-g16-w16"))
        gqa_model(torch.zeros(1, 31, dtype=torch.long), kivi)  # the window full: the next token closes a group
        assert kivi[0].offset - kivi[0].quantized == kivi[0].recent_keys.shape[2]
        assert fused.decode_step(gqa_model, token, kivi) is None
        assert gqa_model(token, kivi).isfinite().all() and kivi[0].quantized == 16
        assert fused.decode_step(gqa_model, token, kivi) is not None

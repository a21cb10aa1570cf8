"""The fused native decode step against the op-at-a-time PyTorch path (itself checked against transformers in
test_models and test_moe), teacher-forced over many positions, for every weight kind the step reads and the model
variants it covers (dense and MoE); and the cases it must hand back to the op-at-a-time path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import quantize as gguf_quantize

from edgellm.kv import DenseKVCache
from edgellm.loader import load
from edgellm.models import fused
from edgellm.quant import QuantizedLinear, QuantizedTensor, WeightFormat
from edgellm.quant.linear import prepare_quantized, quantize_lm_head, quantize_model
from tests.conftest import CONFIGS
from tests.test_kquants import random_blocks
from tests.test_moe import MOE_CONFIGS

pytestmark = pytest.mark.skipif(fused.load_extension("step") is None, reason="native step not built")

PROMPT, STEPS = 6, 20


def logits_per_step(model, ids: torch.Tensor, use_fused: bool, cache_dtype=torch.float32, capacity: int = 64,
                    prefill: bool = True):
    """Logits of every position after the prompt, fed one token at a time (teacher-forced); the prompt goes in as
    one prefill, or also token by token (so a bf16 model's op-at-a-time prefill rounds nothing the step reads)."""
    cache = [DenseKVCache(1, model.args.num_key_value_heads, model.args.head_dim, capacity, cache_dtype)
             for _ in model.model.layers]
    out = []
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setenv("EDGELLM_FUSED_STEP", "1" if use_fused else "0")
        if prefill:
            model(ids[:, :PROMPT], cache)
        for i in range(0 if not prefill else PROMPT, ids.shape[1]):
            logits = model(ids[:, i:i + 1], cache)[0, -1].float()
            if i >= PROMPT:
                out.append(logits)
    assert cache[0].offset == ids.shape[1]
    return torch.stack(out)


def tokens(model, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.args.vocab_size, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))


def ran_fused(model) -> bool:
    return isinstance(model.__dict__.get("_fused"), fused.FusedStep)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),  # GQA 4/2
    ("llama", {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64}}),
    ("qwen2", {}),  # q/k/v bias
    ("qwen3", {}),  # q/k RMS norms, head_dim 32 != hidden / heads
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
])
def test_fp32_matches_op_path(checkpoint, arch, overrides):
    assert_fp32_matches_op_path(checkpoint(arch, **overrides))


def assert_fp32_matches_op_path(path) -> None:
    """Teacher-forced fp32 logits of the fused step within 1e-4 of the op path's, the plan having really run."""
    model, _ = load(path, dtype="fp32")
    ids = tokens(model)
    ref = logits_per_step(model, ids, use_fused=False)
    assert not ran_fused(model)
    got = logits_per_step(model, ids, use_fused=True)
    assert ran_fused(model)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_bf16_weights_compute_in_fp32(checkpoint):
    """bf16 weights are read as stored and everything else stays fp32: the op path on the same weights upcast (the
    logits come back in the model's dtype, hence the bf16 rounding's relative error)."""
    model, _ = load(checkpoint("qwen2"), dtype="bf16")
    ids = tokens(model)
    got = logits_per_step(model, ids, use_fused=True, prefill=False)
    assert ran_fused(model)
    ref = logits_per_step(model.float(), ids, use_fused=False, prefill=False)
    torch.testing.assert_close(got, ref, rtol=2**-8, atol=1e-4)


def test_bf16_cache_is_written_as_the_op_path_writes_it(checkpoint):
    model, _ = load(checkpoint("llama"), dtype="bf16")
    ids = tokens(model)
    got = logits_per_step(model, ids, use_fused=True, cache_dtype=torch.bfloat16, prefill=False)
    ref = logits_per_step(model.float(), ids, use_fused=False, cache_dtype=torch.bfloat16, prefill=False)
    torch.testing.assert_close(got, ref, rtol=2**-8, atol=1e-4)


def gguf_linear(module: torch.nn.Linear, kind: str, seed: int) -> QuantizedLinear:
    """A projection in a format edgellm reads from GGUF files only: the gguf package's own quantizer for the
    32-blocks, valid random blocks for the k-quants (gguf cannot quantize to them)."""
    n, k = module.weight.shape
    if kind.endswith("_k"):
        blocks = random_blocks(kind, n, k, seed, scale=0.02 / 32)
    else:
        blocks = gguf_quantize(module.weight.detach().numpy(), GT[kind.upper()])
    qt = QuantizedTensor(WeightFormat.gguf(kind), (n, k), {"blocks": torch.from_numpy(blocks.reshape(n, -1))})
    return QuantizedLinear.from_quantized(qt)


# Q4_0 alone runs op at a time through the T-MAC table lookup, whose activation rounding differs from the VNNI
# kernels' int8 blocks: a looser bound. The others share the step's row kernels; what is left are ulp-level
# differences (SiLU's exp) that can flip one int8 activation, which moves the logits by up to ~1% of their scale
# (most seeds match bit for bit).
@pytest.mark.parametrize("fmt,tol", [("q8_0", 1e-2), ("q4_0", 3e-2), ("mxfp4", 1e-2), ("q4_k", 1e-2),
                                     ("q6_k", 1e-2), ("q2_k", 1e-2), ("q5_0", 1e-2), ("q4_1", 1e-2), ("q5_1", 1e-2)])
def test_quantized_weights_match_op_path(checkpoint, fmt, tol):
    model, _ = load(checkpoint("llama", hidden_size=256, intermediate_size=512), dtype="fp32")
    if fmt in ("q8_0", "q4_0", "mxfp4"):
        quantize_model(model, fmt)
    else:
        for i, layer in enumerate(model.model.layers):
            projections = [("self_attn", name) for name in fused.ATTENTION] + [("mlp", name) for name in fused.MLP]
            for j, (part, name) in enumerate(projections):
                parent = getattr(layer, part)
                setattr(parent, name, gguf_linear(getattr(parent, name), fmt, seed=10 * i + j))
    quantize_lm_head(model)
    prepare_quantized(model)
    ids = tokens(model, seed=1)
    ref = logits_per_step(model, ids, use_fused=False)
    got = logits_per_step(model, ids, use_fused=True)
    assert ran_fused(model)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= tol * scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("qwen2_moe", {"num_experts": 8, "moe_intermediate_size": 96, "shared_expert_intermediate_size": 160}),
])
def test_two_threads_give_the_same_bits(moe_checkpoint, arch, overrides):
    """Threads split rows, each computed whole by one thread: the same bits at any thread count (for MoE, across
    the chosen experts' concatenated gate/up rows, then their downs)."""
    model, _ = load(moe_checkpoint(arch, hidden_size=256, intermediate_size=512, **overrides), dtype="fp32")
    quantize_model(model, "q8_0")
    prepare_quantized(model)
    ids = tokens(model)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = logits_per_step(model, ids, use_fused=True)
        torch.set_num_threads(2)
        two = logits_per_step(model, ids, use_fused=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_cache_grows_past_its_reservation(checkpoint):
    model, _ = load(checkpoint("llama"), dtype="fp32")
    ids = tokens(model)
    ref = logits_per_step(model, ids, use_fused=False)
    got = logits_per_step(model, ids, use_fused=True, capacity=PROMPT)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_swapped_modules_get_a_new_plan(checkpoint):
    model, _ = load(checkpoint("llama", hidden_size=256, intermediate_size=512), dtype="fp32")
    ids = tokens(model)
    logits_per_step(model, ids, use_fused=True)
    old = model.__dict__["_fused"]
    quantize_model(model, "q8_0")
    prepare_quantized(model)
    got = logits_per_step(model, ids, use_fused=True)
    assert model.__dict__["_fused"] is not old
    ref = logits_per_step(model, ids, use_fused=False)
    assert (got - ref).abs().max() <= 5e-3 * ref.abs().max()


# The intN and ternary formats run in the step through the table-lookup copy made at load, with the kernel, tables and
# group sums of the op-at-a-time path. q/k/v and gate/up widths that are not whole 64-row blocks (96, 160) check
# the clipped edge blocks; what is left are SiLU's ulp-level differences, which can flip one int8 table entry.
@pytest.mark.parametrize("fmt", ["int4-g64", "int3-g64", "int2-g64", "int2-g32", "ternary"])
def test_table_lookup_formats_match_op_path(checkpoint, fmt):
    model, _ = load(checkpoint("llama", hidden_size=192, intermediate_size=160), dtype="fp32")
    quantize_model(model, fmt)
    prepare_quantized(model)
    assert all(layer.mlp.down_proj.lut is not None for layer in model.model.layers)
    ids = tokens(model, seed=2)
    ref = logits_per_step(model, ids, use_fused=False)
    got = logits_per_step(model, ids, use_fused=True)
    assert ran_fused(model)
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_what_the_step_does_not_cover_runs_op_at_a_time(checkpoint):
    """A sliding window in reach and a batch of two fall back (quantized caches: test_fused_kv)."""
    model, _ = load(checkpoint("mistral", sliding_window=8), dtype="fp32")
    ids = tokens(model)
    ref = logits_per_step(model, ids, use_fused=False)
    got = logits_per_step(model, ids, use_fused=True)  # positions past 8 fall back: same numbers either way
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)

    model, _ = load(checkpoint("llama", hidden_size=128), dtype="fp32")
    batch = [DenseKVCache(2, model.args.num_key_value_heads, model.args.head_dim, 8, torch.float32)
             for _ in model.model.layers]
    assert fused.decode_step(model, torch.zeros(1, 1, dtype=torch.long), batch) is None
    assert np.isfinite(model(torch.zeros(2, 1, dtype=torch.long), batch).numpy()).all()


@pytest.fixture
def moe_checkpoint(checkpoint, monkeypatch):
    """checkpoint(), knowing test_moe's tiny MoE families (4 experts, top-2, unless overridden)."""
    for name, entry in MOE_CONFIGS.items():
        monkeypatch.setitem(CONFIGS, name, entry)
    return checkpoint


MOE_CASES = {
    "mixtral": ("mixtral", {"num_local_experts": 8}),  # softmax, top-2, renormalised
    "qwen2_moe": ("qwen2_moe", {"num_experts": 8}),  # q/k/v bias, shared expert behind a sigmoid gate
    "qwen2_moe-dense-layers": ("qwen2_moe", {"num_hidden_layers": 3, "decoder_sparse_step": 2,
                                             "mlp_only_layers": [2]}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 3}),  # per-head q/k norms, renormalised
    "qwen3_moe-unnormalised": ("qwen3_moe", {"norm_topk_prob": False}),
    "olmoe": ("olmoe", {"num_experts": 8}),  # q/k norms over the whole projection, weights not renormalised
    "olmoe-clip": ("olmoe", {"clip_qkv": 0.5}),
}


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_fp32_matches_op_path(moe_checkpoint, case):
    arch, overrides = MOE_CASES[case]
    assert_fp32_matches_op_path(moe_checkpoint(arch, **overrides))


def test_moge_routing_runs_in_the_step(moe_checkpoint):
    """MoGE (edgellm-trained models): the top 2 of each of 2 expert groups, weights x a per-expert scale, not
    renormalised, computed in the step as the op path's grouped_topk does."""
    model, _ = load(moe_checkpoint("qwen3_moe", num_experts=8, num_experts_per_tok=4), dtype="fp32")
    g = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        layer.mlp.routing, layer.mlp.groups = "moge", 2
        layer.mlp.expert_scale = torch.nn.Parameter(torch.rand(8, generator=g) * 4, requires_grad=False)
    ids = tokens(model, seed=6)
    ref = logits_per_step(model, ids, use_fused=False)
    got = logits_per_step(model, ids, use_fused=True)
    assert ran_fused(model)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_a_swapped_expert_weight_gets_a_new_plan(moe_checkpoint):
    """Steps keep their plan; one expert's weight replaced by setattr (as an offload re-pin does) makes the next
    step build a new one over it: the logits follow the op path on the new weight (the old plan's would not)."""
    model, _ = load(moe_checkpoint("qwen3_moe", num_experts=8, num_experts_per_tok=4), dtype="fp32")
    ids = tokens(model, seed=4)
    logits_per_step(model, ids, use_fused=True)
    old = model.__dict__["_fused"]
    logits_per_step(model, ids, use_fused=True)
    assert model.__dict__["_fused"] is old  # nothing edited: no rebuild between steps
    for expert in model.model.layers[0].mlp.experts:
        down = expert.down_proj
        down.weight = torch.nn.Parameter(torch.randn_like(down.weight) * 0.2, requires_grad=False)
    ref = logits_per_step(model, ids, use_fused=False)
    got = logits_per_step(model, ids, use_fused=True)
    assert ran_fused(model) and model.__dict__["_fused"] is not old
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_moe_quantized_experts_match_op_path(moe_checkpoint, arch):
    """Q8_0 experts: the plan made over the fp32 weights is replaced, and the logits follow the op path's. The router
    stays fp32, but its input comes from int8 dot products: where two experts' scores nearly tie, an ulp of
    difference may pick the other one, so a few positions may differ by more than the bound, never many."""
    experts = {"num_local_experts" if arch == "mixtral" else "num_experts": 8}
    sizes = {"moe_intermediate_size": 96, "shared_expert_intermediate_size": 160} if arch == "qwen2_moe" else {}
    model, _ = load(moe_checkpoint(arch, hidden_size=256, intermediate_size=128, **experts, **sizes), dtype="fp32")
    ids = tokens(model, seed=1)
    logits_per_step(model, ids, use_fused=True)
    old = model.__dict__["_fused"]
    quantize_model(model, "q8_0")
    quantize_lm_head(model)
    prepare_quantized(model)
    ref = logits_per_step(model, ids, use_fused=False)
    got = logits_per_step(model, ids, use_fused=True)
    assert ran_fused(model) and model.__dict__["_fused"] is not old
    off = (got - ref).abs().amax(-1) > 5e-3 * ref.abs().max()
    assert off.float().mean() <= 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_moe_experts_in_a_table_lookup_format_run_in_the_step(moe_checkpoint):
    model, _ = load(moe_checkpoint("qwen3_moe", hidden_size=128, moe_intermediate_size=64), dtype="fp32")
    quantize_model(model, "int4-g64", skip=["*.self_attn.*"])
    prepare_quantized(model)
    ids = tokens(model, seed=3)
    ref = logits_per_step(model, ids, use_fused=False)
    got = logits_per_step(model, ids, use_fused=True)
    assert ran_fused(model)
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_a_weight_without_a_kernel_the_step_reads_runs_op_at_a_time(checkpoint, monkeypatch):
    """A table-lookup format whose copy was not made (no native build of that kernel) leaves the model op at a time."""
    model, _ = load(checkpoint("llama", hidden_size=128), dtype="fp32")
    quantize_model(model, "int4-g64")
    prepare_quantized(model)
    model.model.layers[1].mlp.down_proj.lut = None
    logits_per_step(model, tokens(model), use_fused=True)
    assert model.__dict__["_fused"] is False


@pytest.mark.parametrize("arch,dtype,cache_dtype", [
    ("llama", "fp32", torch.float32), ("qwen3", "fp32", torch.float32), ("llama", "bf16", torch.bfloat16),
    ("qwen2", "bf16", torch.float32)])
def test_multi_step_equals_single_steps(checkpoint, arch, dtype, cache_dtype):
    """11 tokens through multi_step (two groups of rows per weight read) give, row for row, the logits 11 single
    decode steps give, bit for bit, and leave the same cache: checking drafts changes no greedy choice."""
    model, _ = load(checkpoint(arch), dtype=dtype)
    ids = tokens(model)
    n = 11

    def run(one_at_a_time: bool) -> tuple[torch.Tensor, list[DenseKVCache]]:
        cache = [DenseKVCache(1, model.args.num_key_value_heads, model.args.head_dim, 8, cache_dtype)
                 for _ in model.model.layers]  # small: both ways grow it
        with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
            mp.setenv("EDGELLM_FUSED_STEP", "1")
            assert fused.multi_step(model, ids[:, :PROMPT], cache) is not None
            if one_at_a_time:
                rows = torch.cat([fused.decode_step(model, ids[:, i:i + 1], cache)[0]
                                  for i in range(PROMPT, PROMPT + n)])
            else:
                rows = fused.multi_step(model, ids[:, PROMPT:PROMPT + n], cache)[0]
        return rows, cache

    single, single_cache = run(True)
    many, many_cache = run(False)
    assert torch.equal(single, many)
    for a, b in zip(single_cache, many_cache, strict=True):
        assert a.offset == b.offset == PROMPT + n
        assert torch.equal(a.keys[:, :, :a.offset], b.keys[:, :, :b.offset])
        assert torch.equal(a.values[:, :, :a.offset], b.values[:, :, :b.offset])


def test_multi_step_matches_op_path_and_declines_what_it_does_not_cover(checkpoint):
    """fp32 logits of a short chunk within 1e-4 of the op path; a quantized model and a selected batch of two
    rows go op at a time."""
    model, _ = load(checkpoint("llama"), dtype="fp32")
    ids = tokens(model)
    cache = [DenseKVCache(1, model.args.num_key_value_heads, model.args.head_dim, 64, torch.float32)
             for _ in model.model.layers]
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setenv("EDGELLM_FUSED_STEP", "0")
        ref = model(ids[:, :9], cache)
        for c in cache:
            c.trim(9)
        mp.setenv("EDGELLM_FUSED_STEP", "1")
        got = fused.multi_step(model, ids[:, :9], cache)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        assert fused.multi_step(model, ids[:, :fused.MANY_MAX + 1], cache) is None  # longer: GEMMs
        assert fused.multi_step(model, torch.cat([ids[:, :4], ids[:, :4]]), cache) is None  # a batch
    quantize_model(model, "q8_0")
    prepare_quantized(model)
    with torch.inference_mode():
        assert fused.multi_step(model, ids[:, :4], cache) is None

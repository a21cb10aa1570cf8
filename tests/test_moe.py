"""Mixture-of-Experts families: logit, greedy and cached-decode parity with transformers, and the routing helpers."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from edgellm import generate, load
from edgellm.kv.prompt_cache import PromptCache
from edgellm.models.moe import grouped_topk, imbalance, mix_experts
from edgellm.quant.convert import quantize_checkpoint
from edgellm.quant.linear import QuantizedLinear
from edgellm.runner import prefill_tokens
from tests.conftest import CONFIGS, build_checkpoint
from tests.test_models import assert_logits_match_transformers, hf_model

MOE = {"num_experts_per_tok": 2}
MOE_CONFIGS = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, {**MOE, "num_local_experts": 4}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, {**MOE, "num_experts": 4}),
}
CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-window": ("mixtral", {"sliding_window": 16}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe-dense-layers": ("qwen2_moe", {"num_hidden_layers": 3, "decoder_sparse_step": 2, "mlp_only_layers": [2]}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-unnormalised": ("qwen3_moe", {"norm_topk_prob": False, "head_dim": 32}),
    "olmoe": ("olmoe", {}),
    "olmoe-clip": ("olmoe", {"clip_qkv": 0.5}),
}


@pytest.fixture
def moe_checkpoint(tmp_path, monkeypatch):
    """Factory: moe_checkpoint(arch, **overrides) -> a tiny saved HF MoE model (4 experts, top-2, hidden 64)."""
    for name, entry in MOE_CONFIGS.items():
        monkeypatch.setitem(CONFIGS, name, entry)
    return lambda arch, **overrides: build_checkpoint(tmp_path / arch, arch, **overrides)




@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(moe_checkpoint, case):
    arch, overrides = CASES[case]
    assert_logits_match_transformers(moe_checkpoint(arch, **overrides), length=48)


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_greedy_generation_matches_transformers(moe_checkpoint, arch):
    path = moe_checkpoint(arch)
    model, tokenizer = load(path, "fp32")
    prompt = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = hf_model(path).generate(prompt, max_new_tokens=8, do_sample=False)[0, 24:].tolist()
    assert generate(model, tokenizer, prompt[0].tolist(), 8).tokens == ref


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
def test_cached_decode_equals_full_forward(moe_checkpoint, arch):
    path = moe_checkpoint(arch)
    model, _ = load(path, "fp32")
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(3))
    cache = PromptCache(model, capacity=8)  # small: grows in place
    with torch.no_grad():
        full = model(ids)[0]
        steps = [prefill_tokens(model, ids[0, :20].tolist(), cache, chunk=8)]
        steps += [model(ids[:, i:i + 1], cache.layers, last_only=True)[0, -1] for i in range(20, 32)]
    assert (torch.stack(steps[1:]) - full[20:]).abs().max().item() <= 1e-4
    assert (steps[0] - full[19]).abs().max().item() <= 1e-4


def test_fused_3d_experts_load_like_per_expert_ones(moe_checkpoint):
    path = moe_checkpoint("qwen3_moe")
    model, _ = load(path, "fp32")
    weights = load_file(path / "model.safetensors")
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([weights.pop(f"{prefix}.{i}.{part}_proj.weight") for part in ("gate", "up")])
                   for i in range(4)]
        weights[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        weights[f"{prefix}.down_proj"] = torch.stack([weights.pop(f"{prefix}.{i}.down_proj.weight") for i in range(4)])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    fused, _ = load(path, "fp32")
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(fused(ids), model(ids))


def test_mix_experts_matches_a_per_token_loop():
    experts = torch.nn.ModuleList(torch.nn.Linear(8, 8, bias=False) for _ in range(5))
    x = torch.randn(7, 8)
    weights, index = torch.rand(7, 2), torch.stack([torch.randperm(5)[:2] for _ in range(7)])
    ref = torch.stack([sum(w * experts[e](x[t]) for w, e in zip(weights[t], index[t].tolist(), strict=True))
                       for t in range(7)])
    with torch.no_grad():
        assert torch.allclose(mix_experts(x, weights, index, experts), ref, atol=1e-6)


def test_grouped_topk_matches_a_loop():
    logits, scale = torch.randn(6, 12), torch.rand(12) + 0.5
    weights, index = grouped_topk(logits, groups=3, k_per_group=2, scale=scale)
    probs = torch.softmax(logits, -1)
    for t in range(6):
        want = []
        for g in range(3):
            group = sorted(range(4 * g, 4 * g + 4), key=lambda e: -probs[t, e].item())[:2]
            want += [(e, probs[t, e].item() * scale[e].item()) for e in group]
        assert index[t].tolist() == [e for e, _ in want]
        assert torch.allclose(weights[t], torch.tensor([w for _, w in want]))
    with pytest.raises(ValueError, match="equal groups"):
        grouped_topk(logits, groups=5, k_per_group=1)


def test_imbalance_is_load_spread_over_tokens():
    assert imbalance(torch.tensor([[0, 1], [0, 2], [0, 3]]), 4) == pytest.approx((3 - 1) / 3)
    assert imbalance(torch.tensor([[0, 1], [2, 3]]), 4) == 0.0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_bf16_moe_matches_transformers(moe_checkpoint, arch):
    """A bf16 checkpoint in bf16 stays mapped: neither q/k/v nor any expert's gate/up is fused into a copy."""
    path = moe_checkpoint(arch, dtype=torch.bfloat16)
    model, _ = load(path, "bf16")
    block = model.model.layers[0].mlp
    assert block.experts[0].gate_up is None and model.model.layers[0].self_attn.qkv is None
    assert not hasattr(block, "shared_expert") or block.shared_expert.gate_up is None
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(model(ids).float(), hf_model(path).to(torch.bfloat16)(ids).logits.float(), atol=3e-2)


def test_quantize_covers_mixtral_experts(moe_checkpoint, tmp_path):
    """`edgellm quantize` finds Mixtral's `block_sparse_moe.experts.N.w1/w2/w3` projections, not only attention's."""
    path = moe_checkpoint("mixtral")
    report = quantize_checkpoint(path, tmp_path / "q8", "q8_0", dtype="fp32")
    assert report.quantized_tensors == 2 * (4 + 4 * 3)  # per layer: q/k/v/o and each of 4 experts' w1/w2/w3
    model, _ = load(tmp_path / "q8", "fp32")
    experts = [e for layer in model.model.layers for e in layer.mlp.experts]
    assert all(isinstance(getattr(e, p), QuantizedLinear) for e in experts for p in ("gate_proj", "up_proj",
                                                                                      "down_proj"))
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf_model(path)(ids).logits
        assert (model(ids) - ref).norm() <= 0.05 * ref.norm()

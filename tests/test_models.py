"""Logit and greedy-generation parity with transformers' own implementations."""

from __future__ import annotations

import pytest
import torch
import transformers

from edgellm import load
from edgellm.kv.prompt_cache import PromptCache
from edgellm.models.rope import RotaryEmbedding
from edgellm.runner import prefill_tokens

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CASES = {
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-gqa2": ("llama", {"num_key_value_heads": 2}),
    "llama-gqa4-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-head-dim": ("llama", {"head_dim": 24, "attention_bias": True}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic-rope": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                     "max_position_embeddings": 48}),
    "mistral": ("mistral", {}),
    "mistral-window": ("mistral", {"sliding_window": 16}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen3": ("qwen3", {}),
}


def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(checkpoint, case):
    arch, overrides = CASES[case]
    assert_logits_match_transformers(checkpoint(arch, **overrides), length=64)


def assert_logits_match_transformers(path, length: int) -> None:
    """fp32 logits of `length` seeded token ids within 1e-4 of transformers' own model on the same checkpoint."""
    model, _ = load(path, "fp32")
    ids = torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(path)(ids).logits
        ours = model(ids)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["llama-gqa2", "llama3-rope", "mistral-window", "qwen2", "qwen3"])
def test_greedy_generation_matches_transformers(checkpoint, case):
    arch, overrides = CASES[case]
    path = checkpoint(arch, **overrides)
    model, _ = load(path, "fp32")
    prompt = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    ref = hf_model(path).generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 40:].tolist()
    cache = PromptCache(model, capacity=8)  # deliberately small: exercises in-place growth
    logits = prefill_tokens(model, prompt[0].tolist(), cache, chunk=16)  # chunked prefill with an offset mask
    ours = []
    with torch.no_grad():
        for _ in range(32):
            ours.append(int(logits.argmax()))
            logits = model(torch.tensor([[ours[-1]]]), cache.layers, last_only=True)[0, -1]
    assert ours == ref


def test_sharded_bf16_checkpoint_loads(checkpoint):
    path = checkpoint("llama", dtype=torch.bfloat16, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    model, _ = load(path, "bf16")
    ref = hf_model(path)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(ids).float(), ref.to(torch.bfloat16)(ids).logits.float(), atol=2e-2)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_weights_are_memory_mapped_not_copied(checkpoint):
    path = checkpoint("llama")
    model, _ = load(path, "fp32")
    regions = mapped_regions(path)
    ptr = model.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert any(lo <= ptr < hi for lo, hi in regions), "weight is not backed by the mmap'd safetensors file"


def mapped_regions(path):
    """Address ranges of the process's mappings of `path`'s safetensors file."""
    weights, regions = str((path / "model.safetensors").resolve()), []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(weights):
                regions.append(tuple(int(x, 16) for x in line.split()[0].split("-")))
    return regions


def test_bf16_weights_stay_mapped_unfused(checkpoint):
    """A bf16 checkpoint loaded in bf16 is not copied: fusing q/k/v and gate/up would add ~0.6x the file of private
    memory beside the mapping. Every projection reads from the file, and the logits are transformers'."""
    path = checkpoint("qwen2", dtype=torch.bfloat16)
    model, _ = load(path, "bf16")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv is None and mlp.gate_up is None
    regions = mapped_regions(path)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert any(lo <= proj.weight.data_ptr() < hi for lo, hi in regions)
    ref = hf_model(path).to(torch.bfloat16)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(model(ids).float(), ref(ids).logits.float(), atol=3e-2)


def test_bf16_fused_projections_are_not_stored_twice(checkpoint):
    path = checkpoint("qwen2")  # fp32, converted to bf16 at load: the copy is made anyway; q/k/v biases fused too
    model, _ = load(path, "bf16")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    fused_qkv, fused_bias = attn.qkv
    assert attn.q_proj.weight.data_ptr() == fused_qkv.data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == fused_qkv.untyped_storage().data_ptr()
    assert attn.k_proj.bias.untyped_storage().data_ptr() == fused_bias.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up[0].untyped_storage().data_ptr()
    ref = hf_model(path).to(torch.bfloat16)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(model(ids).float(), ref(ids).logits.float(), atol=3e-2)


@pytest.mark.parametrize("scaling", [None, LLAMA3_ROPE, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "dynamic", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}])
def test_decode_step_rotation_is_the_tables_row(scaling):
    """The fused decode step's one-position cos/sin (`cos_sin_at`) are `cos_sin`'s, bit for bit, incl. past the
    trained context (dynamic NTK stretches there)."""
    rope = RotaryEmbedding(64, 10000.0, 48, scaling)
    for pos in (0, 1, 31, 47, 300, 70000):
        cos, sin = rope.cos_sin(torch.tensor([[pos]]), torch.float32)
        at = rope.cos_sin_at(pos)
        assert torch.equal(at[0], cos.reshape(-1)) and torch.equal(at[1], sin.reshape(-1))

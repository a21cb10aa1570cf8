"""gpt-oss (GptOssForCausalLM): logit, greedy and cached-decode parity with transformers; attention sinks, per-layer
sliding windows, YaRN RoPE, the clamped-SwiGLU experts; the CLI; quantize; refused KV cache kinds."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from edgellm import generate, load
from edgellm.errors import UnsupportedModelError
from edgellm.kv import KVFormat, QuantizedKVCache, batch_layers, make_caches
from edgellm.kv.prompt_cache import PromptCache
from edgellm.models import fused
from edgellm.models import gpt_oss as gpt_oss_module
from edgellm.models.gpt_oss import Model
from edgellm.quant.convert import quantize_checkpoint
from edgellm.quant.linear import QuantizedLinear
from edgellm.runner import prefill_tokens
from tests.conftest import CONFIGS, build_checkpoint
from tests.test_errors import assert_one_line_error, run_cli
from tests.test_models import hf_model

WINDOW = 8  # well inside the 48-token test sequence, so the sliding layers' window matters
GPT_OSS = (transformers.GptOssConfig, transformers.GptOssForCausalLM,
           {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32, "head_dim": 16,
            "sliding_window": WINDOW, "num_hidden_layers": 4})


@pytest.fixture
def gpt_oss(tmp_path, monkeypatch):
    """Factory: gpt_oss(expert_scale=1.0, **overrides) -> a tiny saved gpt-oss (4 layers sliding/full, 4 experts
    top-2, hidden 64, YaRN). transformers initialises biases to zero and sinks near it: they are redrawn here so each
    matters; `expert_scale` enlarges gate_up_proj so the SwiGLU clamp (limit 7) is hit."""
    monkeypatch.setitem(CONFIGS, "gpt_oss", GPT_OSS)
    counter = iter(range(100))

    def make(expert_scale: float = 1.0, **overrides):
        path = build_checkpoint(tmp_path / f"gpt_oss-{next(counter)}", "gpt_oss", **overrides)
        weights = load_file(path / "model.safetensors")
        g = torch.Generator().manual_seed(7)
        for name, tensor in weights.items():
            if name.endswith(("bias", "sinks")):
                scale = 1.0 if name.endswith("sinks") else 0.3
                weights[name] = (torch.randn(tensor.shape, generator=g) * scale).to(tensor.dtype)
            elif name.endswith("gate_up_proj"):
                weights[name] = tensor * expert_scale
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return path

    return make


def logits_pair(path, length=48, zero_sinks=False):
    model, _ = load(path, "fp32")
    if zero_sinks:
        for layer in model.model.layers:
            layer.self_attn.sinks.zero_()
    ids = torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids), hf_model(path)(ids).logits


@pytest.mark.parametrize("case", [{}, {"expert_scale": 200.0}, {"num_key_value_heads": 4, "sliding_window": 5},
                                  {"layer_types": ["full_attention", "sliding_attention", "sliding_attention",
                                                   "full_attention"]}])
def test_logits_match_transformers(gpt_oss, case):
    ours, ref = logits_pair(gpt_oss(**case))
    assert (ours - ref).abs().max().item() <= 1e-4


def test_layer_kinds_yarn_and_no_fused_step(gpt_oss):
    model, _ = load(gpt_oss(), "fp32")
    assert [layer.self_attn.window for layer in model.model.layers] == [WINDOW, None, WINDOW, None]
    assert model.rope.kind == "yarn" and model.rope.attention_scaling > 1
    assert fused.build(model) is None  # the native step computes neither sinks nor these experts


def test_clamp_is_exercised(gpt_oss):
    model, _ = load(gpt_oss(expert_scale=200.0), "fp32")
    x = torch.randn(16, 64)
    expert = model.model.layers[0].mlp.experts[0]
    assert expert.gate_up_proj(model.model.layers[0].post_attention_layernorm(x)).abs().max() > 7


def test_sinks_are_applied(gpt_oss):
    """Parity needs the sinks: with them zeroed (softmax still has a sink column of logit 0) or dropped, the
    logits move far past the parity tolerance."""
    path = gpt_oss()
    ours, ref = logits_pair(path, zero_sinks=True)
    assert (ours - ref).abs().max().item() > 1e-2
    model, _ = load(path, "fp32")
    attn = model.model.layers[1].self_attn
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    with torch.no_grad():
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert (attn.attend(q, k, v, None, None) - plain).abs().max() > 1e-2
        attn.sinks.fill_(-1e4)  # a sink nobody attends to: plain causal attention
        assert torch.allclose(attn.attend(q, k, v, None, None), plain, atol=1e-5)


def test_greedy_generation_matches_transformers(gpt_oss):
    path = gpt_oss()
    model, tokenizer = load(path, "fp32")
    prompt = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    ref = hf_model(path).generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 24:].tolist()
    assert generate(model, tokenizer, prompt[0].tolist(), 12).tokens == ref


def test_cached_decode_equals_full_forward(gpt_oss):
    model, _ = load(gpt_oss(), "fp32")
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(3))
    cache = PromptCache(model, capacity=4)  # small: grows in place
    with torch.no_grad():
        full = model(ids)[0]
        steps = [prefill_tokens(model, ids[0, :20].tolist(), cache, chunk=6)]  # chunks crossing the window
        steps += [model(ids[:, i:i + 1], cache.layers, last_only=True)[0, -1] for i in range(20, 32)]
    assert (torch.stack(steps[1:]) - full[20:]).abs().max().item() <= 1e-4
    assert (steps[0] - full[19]).abs().max().item() <= 1e-4


def test_batched_decode_rows_at_their_own_positions(gpt_oss):
    """Two sequences of different lengths decoded in one pass (SequenceBatch over dense caches) match each alone."""
    model, _ = load(gpt_oss(), "fp32")
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(4))
    caches, alone = [], []
    with torch.no_grad():
        for row, n in ((0, 12), (1, 29)):
            cache = model.make_cache(4)
            model(ids[row:row + 1, :n], cache)
            caches.append(cache)
            alone.append(model(ids[row:row + 1, :n + 1])[0, -1])
        step = torch.stack([ids[0, 12:13], ids[1, 29:30]])
        out = model(step, batch_layers(caches, model.args.sliding_window), last_only=True)[:, -1]
    assert (out - torch.stack(alone)).abs().max().item() <= 1e-4


def test_quantized_kv_cache_is_refused(gpt_oss):
    model, _ = load(gpt_oss(), "fp32")
    with pytest.raises(UnsupportedModelError, match="sinks need the dense KV cache"):
        model.make_cache(16, kv_format=KVFormat.parse("q8"))
    assert len(model.make_cache(16, kv_format=KVFormat.parse("fp32"))) == 4  # dense formats are fine
    cache = make_caches(model, KVFormat.parse("q8"), 16)
    assert type(cache[0]) is QuantizedKVCache
    with pytest.raises(UnsupportedModelError, match="QuantizedKVCache cannot apply them"), torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), cache)


def test_cli_generate(gpt_oss, tmp_path):
    path = gpt_oss()
    result = run_cli("generate", "--model", str(path), "--prompt", "def f(x):", "--max-tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    assert 1 <= len(json.loads(result.stdout)["tokens"]) <= 5
    refused = run_cli("generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "2", "--agent", "a",
                      "--store", str(tmp_path / "agents"), "--kv-format", "q4")
    assert_one_line_error(refused, "sinks need the dense KV cache")


def test_quantize_covers_the_experts(gpt_oss, tmp_path):
    path = gpt_oss()
    report = quantize_checkpoint(path, tmp_path / "q8", "q8_0", dtype="fp32")
    assert report.quantized_tensors == 4 * (4 + 4 * 2)  # per layer: q/k/v/o and each of 4 experts' gate_up/down
    model, _ = load(tmp_path / "q8", "fp32")
    assert isinstance(model, Model)
    experts = [e for layer in model.model.layers for e in layer.mlp.experts]
    assert all(isinstance(getattr(e, p), QuantizedLinear) and getattr(e, p).bias is not None
               for e in experts for p in ("gate_up_proj", "down_proj"))
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf_model(path)(ids).logits
        assert (model(ids) - ref).norm() <= 0.05 * ref.norm()


def test_bf16_matches_transformers(gpt_oss):
    path = gpt_oss(dtype=torch.bfloat16)
    model, _ = load(path, "bf16")
    assert model.model.layers[0].self_attn.qkv is None  # a bf16 file in bf16 stays mapped: nothing fused
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_model(path).to(torch.bfloat16)(ids).logits.float()
        assert torch.allclose(model(ids).float(), ref, atol=3e-2)
        assert model(ids[:, :1], model.make_cache(4)).dtype == torch.bfloat16


def test_windows_yarn_and_query_blocks_matter(gpt_oss, monkeypatch):
    """Parity depends on each piece: full attention on the sliding layers, or YaRN without its attention factor,
    move the logits; splitting the queries into blocks (long prompts) does not."""
    path = gpt_oss()
    _, ref = logits_pair(path)
    model, _ = load(path, "fp32")
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(gpt_oss_module, "SCORES_BUDGET", 4 * 48 * 5)  # blocks of 5 queries
    with torch.no_grad():
        assert (model(ids) - ref).abs().max().item() <= 1e-4
        for layer in model.model.layers:
            layer.self_attn.window = None
        assert (model(ids) - ref).abs().max().item() > 1e-3
    model, _ = load(path, "fp32")
    model.rope.attention_scaling = 1.0
    with torch.no_grad():
        assert (model(ids) - ref).abs().max().item() > 1e-3


def test_experts_within_a_budget_generate_the_same(gpt_oss):
    """Expert offload on this family's block (router with bias, fused gate_up): same tokens, fewer experts in RAM."""
    from edgellm.models import offload

    model, tokenizer = load(gpt_oss(), "fp32")
    prompt = torch.randint(2, 300, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    want = generate(model, tokenizer, prompt, 10).tokens
    store = offload.enable(model, "75%")
    assert generate(model, tokenizer, prompt, 10).tokens == want
    stats = store.stats()
    assert stats["tokens"] == 24 + 9 and stats["prefetched"] > 0 and stats["budget_bytes"] < stats["expert_bytes"]

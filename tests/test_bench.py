"""`edgellm bench speed`: the roofline counters by hand, and end-to-end runs on a tiny checkpoint (no timings)."""

from __future__ import annotations

import json

import pytest
import torch

from edgellm.bench.speed import ModelCost
from edgellm.checkpoint import read_config
from edgellm.cli import main
from edgellm.loader import load_model
from edgellm.perf import measure_hardware

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384,
        "tie_word_embeddings": False}
PER_LAYER_MATMUL = 64 * 64 + 2 * 64 * (2 * 16) + 64 * 64 + 3 * 64 * 128  # q, k+v (2 kv heads × 16), o, gate/up/down
LM_HEAD = 384 * 64
DECODE_WEIGHTS = 2 * (PER_LAYER_MATMUL + 2 * 64) + 64 + LM_HEAD  # + two norms a layer, the final norm, lm_head


def test_model_cost_by_hand():
    cost = ModelCost.from_config(TINY)
    assert cost.layer_matmul_params == 2 * PER_LAYER_MATMUL == 73_728
    assert cost.lm_head_params == LM_HEAD
    assert cost.decode_weight_params == DECODE_WEIGHTS == 98_624
    assert cost.parameters == DECODE_WEIGHTS + 384 * 64  # the embedding table
    assert cost.kv_elems_per_token == 2 * 2 * 2 * 16  # K and V × layers × kv heads × head_dim
    assert cost.attention_width == 2 * 4 * 16
    # 10 tokens: layers for all, lm_head for the last only, causal attention over 55 (query, key) pairs
    assert cost.prefill_flops(10) == 2 * 73_728 * 10 + 2 * LM_HEAD + 4 * 128 * 55 == 1_551_872
    assert cost.decode_bytes(10, 4) == (98_624 + 128 * 10) * 4
    assert cost.mean_decode_bytes(10, 3, 2) == cost.decode_bytes(12, 2)  # the 3 steps attend 11, 12, 13 tokens


def test_tied_lm_head_is_still_read_per_token():
    tied, untied = ModelCost.from_config({**TINY, "tie_word_embeddings": True}), ModelCost.from_config(TINY)
    assert tied.decode_weight_params == untied.decode_weight_params
    assert tied.prefill_flops(7) == untied.prefill_flops(7)
    assert tied.parameters == untied.parameters - LM_HEAD


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_model_cost_matches_loaded_model(checkpoint, arch):
    """q/k/v biases (Qwen2) and q/k norms (Qwen3) are counted too, from the real module tree."""
    path = checkpoint(arch, tie_word_embeddings=True)
    model = load_model(path, torch.float32)
    cost = ModelCost.from_config(read_config(path))
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed
    assert cost.decode_weight_params == sum(p.numel() for p in model.parameters() if p is not embed) + embed.numel()
    assert cost.parameters == sum(p.numel() for p in model.parameters())


def test_hardware_profile_is_measured_once():
    hw = measure_hardware()
    assert hw is measure_hardware()
    assert hw.mem_read_gbs > 0 and hw.threads >= 1 and hw.cpu
    assert hw.peak_gflops(torch.float32) > 0 and hw.peak_gflops(torch.bfloat16) > 0
    assert json.loads(json.dumps(hw.to_json()))["gemm_gflops"].keys() == {"fp32", "bf16"}


def test_bench_speed_end_to_end(checkpoint, tmp_path, capsys):
    path = checkpoint("llama")
    out, png = tmp_path / "speed.json", tmp_path / "plots" / "speed.png"
    assert main(["bench", "speed", "--model", str(path), "--dtype", "fp32", "--prompt-lens", "16,8",
                 "--decode-tokens", "3", "--reps", "2", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert {"settings", "model", "hardware", "engines", "results", "versions", "notes"} <= set(report)
    assert report["settings"]["prompt_lens"] == [8, 16] and report["settings"]["dtype"] == "fp32"
    assert {"cpu", "native_bf16", "mem_read_gbs", "gemm_gflops"} <= set(report["hardware"])
    assert {"torch", "transformers", "edgellm"} <= set(report["versions"])
    assert report["model"]["decode_weight_bytes"] == report["model"]["decode_weight_params"] * 4
    for engine in ("edgellm", "transformers"):
        assert report["engines"][engine]["peak_rss_mib"] > 0
    for row in report["results"]:
        for engine in ("edgellm", "transformers"):
            r = row[engine]
            for key in ("ttft_s", "prefill_tok_s", "prefill_gflops", "prefill_pct_peak", "decode_tok_s",
                        "decode_gbs", "decode_pct_bandwidth"):
                assert r[key] > 0, (engine, key)
            assert r["ttft_s"] == min(r["prefill_s_reps"]) and len(r["decode_s_reps"]) == 2
            assert len(r["tokens"]) == 4  # the first token and one per decode step
        ratio = row["edgellm_over_transformers"]
        assert ratio["greedy_tokens_match"]  # fp32 engines agree: both benchmarks did the same work
        assert ratio["decode_tok_s"] == row["edgellm"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "edgellm/hf" in capsys.readouterr().out


def test_bench_speed_edgellm_alone_bf16(checkpoint, tmp_path):
    path = checkpoint("llama")
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--model", str(path), "--dtype", "bf16", "--prompt-lens", "8",
                 "--decode-tokens", "2", "--reps", "1", "--no-transformers", "--threads", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["engines"] == ["edgellm"]
    assert report["settings"]["threads"] == 1
    row = report["results"][0]
    assert "transformers" not in row and "edgellm_over_transformers" not in row
    assert ("prefill_pct_fp32_peak" in row["edgellm"]) == (not report["hardware"]["native_bf16"])


def test_bench_speed_rejects_prompts_beyond_the_context(checkpoint, capsys):
    path = checkpoint("llama", max_position_embeddings=64)
    assert main(["bench", "speed", "--model", str(path), "--prompt-lens", "60", "--decode-tokens", "8"]) == 2
    assert "context window of 64" in capsys.readouterr().err


def test_bench_speed_bad_arguments(tmp_path, capsys):
    assert main(["bench", "speed", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "speed", "--prompt-lens", "128,abc"])

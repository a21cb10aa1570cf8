"""`edgellm bench moe` end to end on the tiny shape: both engines on one GGUF, active bytes, the offload curve
(no timings asserted: speed lives in the benchmark's figures)."""

from __future__ import annotations

import json

import pytest

from edgellm.bench.moe import RANDOM_MOES
from edgellm.cli import main


@pytest.mark.slow
def test_bench_moe_reports_both_engines_and_the_offload_curve(tmp_path):
    pytest.importorskip("llama_cpp")
    out, png = tmp_path / "moe.json", tmp_path / "moe.png"
    assert main(["bench", "moe", "--shape", "qwen3-moe-tiny", "--formats", "q8_0", "--threads", "1",
                 "--prompt-len", "16", "--decode-tokens", "4", "--reps", "1", "--rounds", "1",
                 "--offload", "1,0.5", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    ours, theirs = row["edgellm"]["1"], row["llama_cpp"]["1"]
    assert {"decode_tok_s", "prefill_tok_s", "active_bytes"} <= set(ours)  # reported, not judged: speed is the bench's
    assert {"decode_tok_s", "prefill_tok_s"} <= set(theirs)
    assert row["ratio"]["1"]["decode_tok_s"] == pytest.approx(ours["decode_tok_s"] / theirs["decode_tok_s"])
    spec = RANDOM_MOES["qwen3-moe-tiny"]
    # top-2 of 8 experts: a quarter of the expert bytes, so well under everything one step could read
    assert ours["active_bytes"] < ours["decode_bytes"]
    expert_bytes = ours["decode_bytes"] - ours["active_bytes"]
    assert expert_bytes > 0 and spec["num_experts_per_tok"] / spec["num_experts"] == 0.25
    full, half = report["offload"]["curve"]
    assert full["share"] == 1 and full["vs_resident"] == 1 and "hit_rate" not in full
    assert half["share"] == 0.5 and 0 < half["hit_rate"] < 1 and half["budget_bytes"] < half["expert_bytes"]
    assert png.stat().st_size > 0 and any(n.startswith("offload:") for n in report["notes"])


def test_bench_moe_rejects_a_bad_share(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "moe", "--offload", "0.5,2"])
    assert exit_.value.code == 2
    assert "(0, 1]" in capsys.readouterr().err


def test_bench_moe_routing_compares_topk_and_moge(tmp_path, capsys):
    """Two shrunk trained MoEs: MoGE's groups take equal load by construction (IS = 0 over its 4 groups)."""
    import shutil

    from edgellm.assets import default_model_path
    from edgellm.train.corpus import stdlib_root
    from edgellm.train.trainer import make_recipe, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("heapq.py", "bisect.py", "fnmatch.py", "functools.py"):
        shutil.copy(stdlib_root() / name, corpus / name)
    small = dict(corpus=str(corpus), steps=4, seq_len=32, batch=2, hidden_size=64, intermediate_size=128,
                 expert_size=32, num_hidden_layers=2, max_position_embeddings=64, tokenizer=str(default_model_path()))
    for preset in ("moe", "moge"):
        train(make_recipe(preset, **small), tmp_path / preset, progress=False)
    out = tmp_path / "r.json"
    assert main(["bench", "moe", "--routing", f"{tmp_path / 'moe'},{tmp_path / 'moge'}", "--routing-tokens", "300",
                 "--json", str(out)]) == 0
    topk, moge = json.loads(out.read_text())["rows"]
    assert topk["routing"] == "topk" and moge["routing"] == "moge" and moge["groups"] == 4
    assert moge["imbalance"]["4"] == 0 and moge["imbalance"]["2"] == 0  # 2 devices hold 2 whole groups each
    assert topk["perplexity"] > 1 and moge["perplexity"] > 1 and topk["tokens"] == moge["tokens"] == 300
    assert 0 < moge["load_entropy_bits"] <= moge["max_entropy_bits"] == 4
    assert "moge" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_moe_offload_curve_of_a_given_model(tmp_path):
    """--offload-model: the curve on a checkpoint given (here the tiny random one), prompted with held-out text."""
    from edgellm.bench.moe import build_random_moe

    model = build_random_moe("qwen3-moe-tiny", str(tmp_path / "moe"))
    out = tmp_path / "offload.json"
    assert main(["bench", "moe", "--offload-model", model, "--formats", "q8_0", "--threads", "1", "--prompt-len",
                 "16", "--decode-tokens", "4", "--offload", "0.5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (half,) = report["offload"]["curve"]  # one share keeps the test short: no all-resident run to compare with
    assert report["settings"]["format"] == "q8_0" and report["model"] == model
    assert half["share"] == 0.5 and 0 < half["hit_rate"] < 1 and half["budget_bytes"] < half["expert_bytes"]
    assert half["vs_resident"] is None and half["tokens"] > 0


def test_bench_moe_offload_model_needs_an_edgellm_export(capsys):
    assert main(["bench", "moe", "--offload-model", "somewhere", "--formats", "q4_k_m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q4_k_m" in err[0] and "q4_0" in err[0]

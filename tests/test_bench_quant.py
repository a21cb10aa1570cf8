"""`edgellm bench quant` end to end on a tiny checkpoint: the report's sizes, bits and quality (no timings)."""

from __future__ import annotations

import json

import pytest

from edgellm.bench.quant import best_round
from edgellm.cli import main


@pytest.mark.slow
def test_bench_quant_reports_size_bits_and_quality(checkpoint, tmp_path, capsys):
    path = checkpoint("llama", hidden_size=128, intermediate_size=256, max_position_embeddings=512)
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    assert main(["bench", "quant", "--model", str(path), "--formats", "fp32,q8_0,int2-g64", "--threads", "1",
          "--prompt-len", "16", "--decode-tokens", "4", "--reps", "1", "--rounds", "2", "--ppl-tokens", "200",
          "--ppl-window", "64",
          "--op-split", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert report["hardware"]["cpu"] and report["hardware"]["cpu_flags"].startswith("flags")  # the machine, recorded
    rows = {r["format"]: r for r in report["rows"]}
    assert set(rows) == {"fp32", "q8_0", "int2-g64"} and all(r["engine"] == "edgellm" for r in rows.values())
    # stored bits per projection weight, scales included: 32, 8 + 16/32, 2 + 2·16/64
    assert rows["fp32"]["bits_per_weight"] == 32 and rows["q8_0"]["bits_per_weight"] == 8.5
    assert rows["int2-g64"]["bits_per_weight"] == 2.5
    assert rows["fp32"]["file_mib"] > rows["q8_0"]["file_mib"] > rows["int2-g64"]["file_mib"]
    # against the fp32 reference (log-probs kept in bf16): fp32 itself is ~0 away, fewer bits drift further
    kl = {f: r["quality"]["mean_kl"] for f, r in rows.items()}
    assert abs(kl["fp32"]) < 1e-4 and kl["fp32"] < kl["q8_0"] < kl["int2-g64"]
    speed = rows["q8_0"]["speed"]["1"]
    assert {"decode_tok_s", "prefill_tok_s", "decode_pct_bandwidth", "dequant_share_pct", "rss_mib"} <= set(speed)
    # --rounds 2: both rounds kept, the best of each speed reported
    assert report["settings"]["rounds"] == 2 and len(speed["rounds"]) == 2
    assert speed["decode_tok_s"] == max(r["decode_tok_s"] for r in speed["rounds"])
    assert speed["prefill_tok_s"] == max(r["prefill_tok_s"] for r in speed["rounds"])
    # --op-split: every format's decode step, split by kind of op (the accounting is tested in test_threads)
    assert all(set(r["speed"]["1"]["op_split"]["ops"]) >= {"mlp_down", "attention", "other"} for r in rows.values())
    printed = capsys.readouterr().out
    assert png.stat().st_size > 0 and "int2-g64" in printed and "one decode step by op" in printed


def test_best_round_takes_each_speed_from_its_fastest_round():
    slow_decode = {"decode_tok_s": 10.0, "prefill_tok_s": 300.0, "rss_mib": 1.0}
    fast_decode = {"decode_tok_s": 12.0, "prefill_tok_s": 200.0, "rss_mib": 2.0}
    best = best_round([slow_decode, fast_decode])
    assert (best["decode_tok_s"], best["prefill_tok_s"], best["rss_mib"]) == (12.0, 300.0, 2.0)
    assert best["rounds"] == [{"decode_tok_s": 10.0, "prefill_tok_s": 300.0}, {"decode_tok_s": 12.0,
                                                                               "prefill_tok_s": 200.0}]
    assert "rounds" not in best_round([slow_decode]) and best_round([slow_decode]) == slow_decode


def test_bench_quant_rejects_unknown_format(capsys):
    assert main(["bench", "quant", "--formats", "q4_0,q5_k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q5_k" in err[0] and "q4_0" in err[0]

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
    assert ours["decode_tok_s"] > 0 and theirs["decode_tok_s"] > 0
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

"""`edgellm bench structured` end to end on the built-in model, with a tiny run: the report's shape, not its speed."""

from __future__ import annotations

import json

from edgellm.cli import main


def test_bench_structured_end_to_end(tmp_path, capsys):
    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--tokens", "12", "--reps", "2", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["free_tok_s"]) == len(report["constrained_tok_s"]) == 2
    assert all(x > 0 for x in report["free_tok_s"] + report["constrained_tok_s"])
    assert report["sample_output"].startswith('{"rows": [{"sku": "')
    assert 0 < report["mask_us"]["median"] <= report["mask_us"]["p90"]
    assert report["cpu"] and report["settings"]["threads"] == 1
    assert report["target_met"] == (report["cost"] <= report["target_cost"])
    assert "cost (median of paired runs)" in capsys.readouterr().out

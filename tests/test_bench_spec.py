"""`edgellm bench spec` end to end on a tiny model drafting for itself: the report's shape, not its speed."""

from __future__ import annotations

import json

from edgellm.cli import main


def test_bench_spec_end_to_end(llama_dir, tmp_path, capsys):
    out, png = tmp_path / "spec.json", tmp_path / "spec.png"
    assert main(["bench", "spec", "--model", str(llama_dir), "--draft-model", str(llama_dir), "--modes",
                 "ngram,draft,kvpred", "--tasks", "code,edit", "--examples", "1", "--max-tokens", "12", "--k", "3",
                 "--threads", "1", "--fixed", "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["task"], r["mode"]) for r in rows] == [(t, m) for t in ("code", "edit") for m in ("ngram", "draft")]
    assert all(r["identical_greedy_output"] and {"reference_tok_s", "spec_tok_s"} <= set(r) for r in rows)
    assert all(r["acceptance_rate"] == 1.0 for r in rows if r["mode"] == "draft")  # the model drafts for itself
    assert report["hardware"]["cpu"] and report["hardware"]["cpu_flags"] and png.stat().st_size > 0
    assert "speedup" in capsys.readouterr().out

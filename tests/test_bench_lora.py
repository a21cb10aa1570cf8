"""`edgellm bench lora` end to end on the built-in model, with a tiny run: the report's shape, not its speed."""

from __future__ import annotations

import json

from edgellm.cli import main


def test_bench_lora_end_to_end(tmp_path, capsys):
    out = tmp_path / "lora.json"
    assert main(["bench", "lora", "--tokens", "6", "--reps", "2", "--rank", "4", "--threads", "1", "--json",
                 str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["base_tok_s"]) == len(report["adapters_tok_s"]) == 2
    assert all(x > 0 for x in report["base_tok_s"] + report["adapters_tok_s"] + report["load_ms"])
    assert len(report["file_bytes"]) == 4
    assert 0 < report["resident_bytes"] <= sum(report["file_bytes"])
    assert "ratio (median of paired runs)" in capsys.readouterr().out

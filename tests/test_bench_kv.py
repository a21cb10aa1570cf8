"""`edgellm bench kv` end to end on a tiny checkpoint: report shape, exact size arithmetic, sanity of each section.

No timing is asserted: only what must hold on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.bench import kv
from edgellm.cli import main
from edgellm.kv import KVFormat
from edgellm.loader import load_model
from edgellm.perf import HardwareProfile

BUDGET_GIB = 0.001
FAKE_HARDWARE = HardwareProfile("test cpu", 1, False, 1.0, {"fp32": 1.0})


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """One run of every section; TTFT at 300 tokens exceeds the tiny model's 256-token window (the twin runs it)."""
    from tests.conftest import build_checkpoint

    root = tmp_path_factory.mktemp("bench-kv")
    path = build_checkpoint(root / "llama", "llama")
    out, png = root / "kv.json", root / "kv.png"
    with pytest.MonkeyPatch.context() as mp:  # the machine's roofs are bench speed's business, and take seconds
        mp.setattr(kv, "measure_hardware", lambda: FAKE_HARDWARE)
        assert main(["bench", "kv", "--model", str(path), "--dtype", "fp32", "--formats", "fp32,fp16,q4,q2-kivi-h",
                     "--contexts", "32,64,300", "--reps", "2", "--budget-gib", str(BUDGET_GIB),
                     "--agent-context", "300", "--quality-tokens", "300", "--memory-context", "4096",
                     "--batch", "1,2,3", "--batch-context", "48", "--batch-tokens", "5", "--batch-format", "q4-kivi",
                     "--workdir", str(root / "agents"), "--json", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    assert not list((root / "agents").iterdir())  # every memory file removed with its temp dir
    return json.loads(out.read_text()) | {"path": str(path)}


def test_report_has_every_section_and_the_context(report):
    assert {"settings", "models", "hardware", "ttft", "decode", "capacity", "quality", "memory", "batch", "targets",
            "checks", "versions", "notes"} <= set(report)
    assert report["settings"]["formats"] == ["fp32", "fp16", "q4", "q2-kivi-h"]
    assert report["models"]["main"]["window"] == 256 and report["models"]["twin"]["window"] == 301
    assert report["models"]["twin"]["random_weights"] and not report["models"]["main"]["random_weights"]
    assert all(report["checks"].values()) and set(report["checks"]) == {
        "restored_cache_gives_the_same_first_token", "batched_greedy_equals_sequential"}
    assert {t["what"].split(" (")[0] for t in report["targets"]} >= {
        "restore / raw read of the file, page cache cold", "restore / raw read of the file, page cache warm",
        "restore into the server's block pool / raw read, page cache warm", "cold prefill / restore from disk",
        "Q4 KV perplexity vs dense, %"}


def test_ttft_rows_say_which_model_ran_them(report):
    rows = report["ttft"]
    assert [(r["context"], r["format"]) for r in rows[:4]] == [(32, f) for f in ("fp32", "fp16", "q4", "q2-kivi-h")]
    assert len(rows) == 12
    for r in rows:
        assert r["model"] == ("random llama" if r["context"] == 300 else "llama")
        assert r["same_first_token_ram_disk"]
        assert r["page_cache"] == "unknown" or r["page_cache"].startswith(("cold", "warm"))
        assert r["cold_over_disk"] == pytest.approx(r["cold_ttft_s"] / r["disk_ttft_s"])
        assert len(r["reps_s"]["cold"]) == 2 and len(r["reps_s"]["disk"]) == 2
        assert r["cold_over_warm_disk"] == pytest.approx(r["cold_ttft_s"] / r["warm_disk_ttft_s"])
        assert len(r["reps_s"]["warm_disk"]) == 2
        # reported; their values are the benchmark's
        assert {"restore_s", "raw_read_s", "ram_ttft_s", "warm_restore_s", "warm_raw_read_s",
                "warm_raw_into_reused_s"} <= set(r)
        assert r["warm_restore_over_raw_into_reused"] == pytest.approx(r["warm_restore_s"]
                                                                       / r["warm_raw_into_reused_s"])
        pooled = r["format"] in ("fp32", "fp16", "q4")  # a block pool holds no kivi cache
        assert (r["warm_pool_restore_s"] is not None) == pooled and len(r["reps_s"]["warm_pool_restore"]) == 2 * pooled


def test_decode_rows_time_every_format_against_the_first(report):
    rows = report["decode"]
    assert [(r["context"], r["format"]) for r in rows] == [(c, f) for c in (32, 64, 300)
                                                           for f in ("fp32", "fp16", "q4", "q2-kivi-h")]
    for r in rows:
        assert r["model"] == ("random llama" if r["context"] == 300 else "llama")
        assert r["baseline"] == "fp32" and len(r["reps_s"]["attention"]) == len(r["reps_s"]["step"]) == 2
        assert r["attention_vs_baseline"] == pytest.approx(
            r["attention_s"] / next(b["attention_s"] for b in rows if b["context"] == r["context"]
                                    and b["format"] == "fp32"))
        assert r["layers"] == 2 and r["cache_bytes"] > 0


def test_capacity_is_the_format_arithmetic(report):
    args = load_model(report["path"]).args
    cap = report["capacity"]
    budget, tokens = int(BUDGET_GIB * 2**30), 300
    fp16_agents = budget // (KVFormat.parse("fp16").bytes_per_token(args) * tokens)
    assert cap["fp16_agents"] == fp16_agents
    for row in cap["rows"]:
        fmt = KVFormat.parse(row["format"])
        assert row["bytes_per_token"] == fmt.bytes_per_token(args)
        # held: the formula's bytes for each quantized token, plus kivi's full-precision window in the model's fp32
        window = tokens - (tokens - fmt.window) // fmt.group * fmt.group if fmt.scheme == "kivi" else 0
        per_window_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * 4
        assert row["agent_bytes"] == fmt.bytes_per_token(args) * (tokens - window) + per_window_token * window
        assert row["agents"] == budget // row["agent_bytes"]
        assert row["agents_vs_fp16"] == row["agents"] / fp16_agents
        assert row["file_bytes_per_token"] > row["held_bytes_per_token"]  # plus the header


def test_quality_reference_against_itself_is_exact(report):
    q = report["quality"]
    rows = {r["format"]: r for r in q["rows"]}
    assert q["scored_tokens"] == 300 - 2 and q["segment_tokens"] == 256  # two segments: 255 + 43 predictions
    for name in ("reference", "fp32"):  # the same dense fp32 cache: bit-identical logits
        assert rows[name]["mean_kl"] == 0 and rows[name]["top1_agreement_pct"] == 100
        assert rows[name]["ppl_delta_pct"] == 0
    assert rows["fp16"]["mean_kl"] < 1e-4 and rows["fp16"]["top1_agreement_pct"] > 95
    assert rows["q4"]["mean_kl"] > 0 and rows["q2-kivi-h"]["mean_kl"] > 0


def test_quantized_decode_never_materialises_the_cache(report):
    rows = {r["format"]: r for r in report["memory"]["rows"]}
    assert rows["q4"]["cache_bytes"] < rows["fp16"]["cache_bytes"] / 2  # head_dim 16: scales weigh more
    # a quantized cache is attended block by block: one step never holds the whole cache in fp32
    assert rows["q4"]["decode_peak_bytes"] < 2 * rows["fp16"]["cache_bytes"]


def test_batched_outputs_equal_sequential(report):
    b = report["batch"]
    assert b["format"] == "q4-kivi"
    assert [r["agents"] for r in b["rows"]] == [1, 2, 3]
    assert b["rows"][-1]["contexts"] == [16, 32, 48]
    assert all(r["outputs_equal"] and r["tokens"] <= 5 * r["agents"] for r in b["rows"])


def test_page_cache_drop_is_checked(tmp_path: Path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"x" * 3 * 4096)
    f.read_bytes()
    assert kv.resident_fraction(f) in (None, 1.0)
    assert kv.drop_page_cache(f) in (None, 0.0, 1.0)  # tmpfs keeps its pages: they are the file


def test_bad_arguments_are_one_line_errors(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(kv, "measure_hardware", lambda: FAKE_HARDWARE)
    assert main(["bench", "kv", "--model", str(checkpoint("llama")), "--sections", "batch",
                 "--batch-context", "300"]) == 2
    assert "window" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "kv", "--formats", "q3"])
    with pytest.raises(SystemExit):
        main(["bench", "kv", "--sections", "ttft,speed"])

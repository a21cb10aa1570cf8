"""`edgellm bench serve --replicas`: starts its own Ray, so it runs apart from test_replicas.py's module cluster."""

from __future__ import annotations

import json

import pytest

from edgellm.cli import main


@pytest.mark.slow
def test_bench_serve_on_replicas_with_failover(tmp_path, capsys):
    """Two replicas at tiny sizes: the report has each figure, and the agent's turn after its home was killed is
    answered by the other replica from the memory the home saved after the turn before (all of it)."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'ray[serve]'")
    out = tmp_path / "report.json"
    assert main(["bench", "serve", "--replicas", "2", "--failover", "--replica-lease", "2", "--concurrency", "2",
                 "--requests", "2", "--prompt-len", "8", "--max-tokens", "4", "--agents", "2", "--turns", "2",
                 "--context-len", "16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    [run] = report["runs"]
    assert run["replicas"] == 2 and run["lease_s"] == 2
    [level] = run["bench"]["levels"]
    assert level["success_rate"] == 1 and "tokens_per_s" in level and level["ttft_p99_s"] >= level["ttft_p50_s"]
    assert run["bench"]["agent_summary"]["warm_cached_share_min"] > 0
    failover = run["failover"]
    assert failover["other_replica"] and failover["replica"] != failover["home_replica"]
    # turn 2's memory was restored (turn 1's holds fewer tokens than turn 2's prompt), not the one before it
    assert failover["saved_tokens"] - 4 < failover["cached_tokens"] <= failover["saved_tokens"]
    assert 2 <= failover["kill_to_first_token_s"] < 30  # not before the dead home's lease lapsed; no hang
    printed = capsys.readouterr().out
    assert "failover" in printed and report["command"].startswith("edgellm bench serve --replicas 2 --failover")


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://127.0.0.1:1", "--replicas", "2"], "give either --url of a running server or --replicas"),
    (["--url", "http://127.0.0.1:1", "--failover"], "--failover, --store and --replica-lease need --replicas"),
    (["--replicas", "1", "--failover"], "--failover needs 2 or more replicas"),
    (["--replicas", "2", "--store", "relative/dir"], "replicas need a shared store URL"),
    (["--replicas", "2", "--replica-lease", "-1"], "--replica-lease must be a positive number"),
])
def test_bench_serve_replica_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

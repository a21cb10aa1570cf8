"""The CLI's happy paths: generate --json, chat that reuses its KV cache, info."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from edgellm.perf.hardware import physical_cores
from tests.test_errors import run_cli


def test_generate_json_has_required_fields(llama_dir):
    result = run_cli("generate", "--model", str(llama_dir), "--prompt", "def f(x):", "--max-tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("text", "tokens", "prompt_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s"):
        assert key in out
    assert out["prompt_tokens"] > 1 and 1 <= len(out["tokens"]) <= 5
    assert out["threads"] == physical_cores()  # llama.cpp's default: one thread per physical core


def test_generate_on_one_thread(llama_dir):
    result = run_cli("generate", "--model", str(llama_dir), "--prompt", "def f(x):", "--max-tokens", "3",
                     "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["threads"] == 1 and 1 <= len(out["tokens"]) <= 3


def test_chat_reuses_kv_cache_between_turns(llama_dir):
    result = subprocess.run([sys.executable, "-m", "edgellm.cli", "chat", "--model", str(llama_dir),
                             "--max-tokens", "4"], input="hello there\nand again\n\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reused = [(int(a), int(b)) for a, b in re.findall(r"reused (\d+)/(\d+) prompt tokens", result.stderr)]
    assert len(reused) == 2
    assert reused[0][0] == 0 and 0 < reused[1][0] < reused[1][1]


def test_info_reports_parameters_and_kv_bytes(llama_dir):
    result = run_cli("info", str(llama_dir), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())
    cfg = ref.config
    assert info["kv_bytes_per_token_fp16"] == 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (
        cfg.hidden_size // cfg.num_attention_heads)


def test_generate_with_agent_reuses_memory_across_processes(llama_dir, tmp_path):
    store = str(tmp_path / "agents")
    args = ["generate", "--model", str(llama_dir), "--agent", "alice", "--store", store, "--kv-format", "q4",
            "--prompt", "def fibonacci(n):", "--max-tokens", "4", "--json"]
    first = json.loads(run_cli(*args).stdout)
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout)
    assert first["cached_tokens"] == 0 and out["cached_tokens"] == out["prompt_tokens"] - 1
    assert out["tokens"] == first["tokens"]

    listed = json.loads(run_cli("agents", "list", "--store", store, "--json").stdout)
    assert [(a["name"], a["kv_format"]) for a in listed] == [("alice", "q4")] and listed[0]["tokens"] > 0
    shown = json.loads(run_cli("agents", "show", "alice", "--store", store).stdout)
    assert shown["kv_format"] and "checksums" not in shown
    assert run_cli("agents", "rm", "alice", "--store", store).returncode == 0
    assert json.loads(run_cli("agents", "list", "--store", store, "--json").stdout) == []


def test_chat_agent_resumes_after_restart(llama_dir, tmp_path):
    store = str(tmp_path / "agents")
    cmd = [sys.executable, "-m", "edgellm.cli", "chat", "--model", str(llama_dir), "--agent", "bob", "--store", store,
           "--max-tokens", "4"]
    first = subprocess.run(cmd, input="hello there\n\n", capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cmd, input="and again\n\n", capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "resuming agent 'bob': 2 messages" in second.stderr
    reused = [int(a) for a, _ in re.findall(r"reused (\d+)/(\d+) prompt tokens", second.stderr)]
    assert reused and reused[0] > 0


@pytest.mark.parametrize("name", ["../evil", "/abs/path"])
def test_agent_names_that_escape_the_store_are_refused(llama_dir, tmp_path, name):
    result = run_cli("generate", "--model", str(llama_dir), "--agent", name, "--store", str(tmp_path),
                     "--prompt", "x")
    assert result.returncode == 2 and "invalid agent name" in result.stderr and "Traceback" not in result.stderr

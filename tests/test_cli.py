"""The CLI's happy paths: generate --json, chat that reuses its KV cache, info."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.test_errors import run_cli


def test_generate_json_has_required_fields(llama_dir):
    result = run_cli("generate", "--model", str(llama_dir), "--prompt", "def f(x):", "--max-tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("text", "tokens", "prompt_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s"):
        assert key in out
    assert out["prompt_tokens"] > 1 and 1 <= len(out["tokens"]) <= 5


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

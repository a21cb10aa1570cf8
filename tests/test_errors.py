"""Bad input: a clear one-line error and a non-zero exit from the CLI, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgellm: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory():
    assert_one_line_error(run_cli("generate", "--model", "/nonexistent/model", "--prompt", "x"), "does not exist")


def test_missing_config(llama_dir, tmp_path):
    d = copy_ckpt(llama_dir, tmp_path / "m")
    (d / "config.json").unlink()
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "no config.json")


def test_missing_weights(llama_dir, tmp_path):
    d = copy_ckpt(llama_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "no *.safetensors")


def test_unknown_architecture_lists_supported(llama_dir, tmp_path):
    d = copy_ckpt(llama_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["GPTBigCodeForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "x"),
                          "GPTBigCodeForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_truncated_safetensors(llama_dir, tmp_path):
    d = copy_ckpt(llama_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "damaged or truncated")


def test_corrupt_safetensors_header(llama_dir, tmp_path):
    d = copy_ckpt(llama_dir, tmp_path / "m")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:40] = b"\x00garbage-not-json-garbage-xxxxxx"
    (d / "model.safetensors").write_bytes(bytes(data))
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "damaged or truncated")


def test_shape_mismatch_names_the_tensor(llama_dir, tmp_path):
    d = copy_ckpt(llama_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "mlp", "shape")


def test_empty_prompt(llama_dir):
    assert_one_line_error(run_cli("generate", "--model", str(llama_dir), "--prompt", ""), "prompt is empty")


def test_prompt_longer_than_context(llama_dir):
    prompt = "def f(x): return x\n" * 200
    assert_one_line_error(run_cli("generate", "--model", str(llama_dir), "--prompt", prompt), "context window")


@pytest.mark.parametrize("flag", [("--temp", "-0.5"), ("--top-p", "0"), ("--min-p", "2"), ("--top-k", "-1"),
                                  ("--max-tokens", "0")])
def test_invalid_sampling_values(llama_dir, flag):
    assert_one_line_error(run_cli("generate", "--model", str(llama_dir), "--prompt", "x", *flag),
                          flag[0].lstrip("-").replace("-", "_").replace("temp", "temperature"))


@pytest.mark.parametrize("key, value", [("hidden_size", "64"), ("hidden_size", True), ("hidden_size", -64),
                                        ("num_hidden_layers", 2.5), ("rope_theta", "x"), ("rms_norm_eps", 0),
                                        ("rope_scaling", 3), ("tie_word_embeddings", "no"),
                                        ("max_position_embeddings", None), ("vocab_size", ...),
                                        ("architectures", "LlamaForCausalLM")])
def test_config_value_types_are_checked_naming_the_key(llama_dir, tmp_path, key, value):
    from edgellm.errors import CheckpointError
    from edgellm.info import model_info
    from edgellm.loader import load_model

    d = copy_ckpt(llama_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    if value is ...:
        del config[key]
    else:
        config[key] = value
    (d / "config.json").write_text(json.dumps(config))
    for read in (model_info, load_model):
        with pytest.raises(CheckpointError, match=key):
            read(d)


def test_config_accepts_ints_for_floats_and_nulls_for_optional_keys(llama_dir, tmp_path):
    from edgellm.info import model_info

    d = copy_ckpt(llama_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "rope_theta": 10000, "head_dim": None,
                                               "rope_scaling": None, "sliding_window": None}))
    assert model_info(d)["hidden_size"] == config["hidden_size"]


def test_config_that_is_not_an_object(llama_dir, tmp_path):
    d = copy_ckpt(llama_dir, tmp_path / "m")
    (d / "config.json").write_text("[]")
    assert_one_line_error(run_cli("info", str(d)), "JSON object")

"""`edgellm lora train`: the adapter it writes is checked against PEFT's own PeftModel on the transformers model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgellm.bench.common import torch_threads
from edgellm.cli import main
from edgellm.generate import generate
from edgellm.loader import load
from edgellm.models.lora import load_adapter, select
from edgellm.quant.convert import quantize_checkpoint
from edgellm.train.lora import LoraRecipe, fit, split_tokens, train_lora
from tests.conftest import build_checkpoint
from tests.test_errors import assert_one_line_error, run_cli
from tests.test_lora import ALL, hf_model, ids, peft_model

TEXT = "the cat sat on the mat and the dog sat on the log. " * 80
STEPS, SEQ_LEN = 30, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: the fastest for these tiny GEMMs on a busy machine, and what makes a run repeat bit for bit."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama with 5x transformers' init scale: its frozen head can then express a fitted text, so the loss a
    rank-8 adapter reaches in a few dozen steps shows training works rather than the head's limits."""
    return build_checkpoint(tmp_path_factory.mktemp("base"), initializer_range=0.1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(base_dir: Path, text_file: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("adapter") / "cat"
    recipe = LoraRecipe(model=str(base_dir), data=str(text_file), steps=STEPS, seq_len=SEQ_LEN, lr=1e-2)
    return out, train_lora(recipe, out, progress=False)


def test_training_lowers_the_loss_under_peft(base_dir, trained):
    """The loss falls, and PEFT running the written adapter scores the held-out text as the training run did."""
    out, summary = trained
    assert summary["steps"] == STEPS
    assert summary["last_loss"] < summary["first_loss"] / 2
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] / 2
    assert json.loads((out / "training_summary.json").read_text())["last_loss"] == summary["last_loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 8, 16)
    assert config["target_modules"] == sorted(ALL)
    _, tokenizer = load(base_dir, "fp32")
    recipe = LoraRecipe(**{**summary["recipe"], "targets": tuple(summary["recipe"]["targets"])})
    _, heldout = split_tokens(np.asarray(tokenizer.encode(TEXT)), recipe)
    with torch.no_grad():
        base = hf_model(base_dir)(heldout[:, :-1]).logits
        tuned = peft_model(base_dir, out)(heldout[:, :-1]).logits
    loss = lambda logits: F.cross_entropy(logits.flatten(0, 1), heldout[:, 1:].flatten()).item()  # noqa: E731
    assert loss(base) == pytest.approx(summary["heldout_loss_before"], abs=1e-3)
    assert loss(tuned) == pytest.approx(summary["heldout_loss_after"], abs=1e-3)


def test_peft_and_edgellm_compute_the_same_adapter(base_dir, trained):
    out, _ = trained
    model, _ = load(base_dir, "fp32")
    prompt = ids(24, 1)
    with torch.no_grad():
        base = model(prompt)
        load_adapter(model, out)
        with select(model, [out.name]):
            ours = model(prompt)
        ref = peft_model(base_dir, out)(prompt).logits
    assert (ref - base).abs().max() > 1e-2  # every tensor name was read: an unread B would leave PEFT at the base
    assert (ours - ref).abs().max() <= 1e-4


def test_base_is_untouched_and_runs_repeat(base_dir):
    """Only A and B train: the base's tensors keep their bits and its modules come back; the same seed gives the
    same adapter."""
    model, tokenizer = load(base_dir, "fp32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {name: type(m) for name, m in model.named_modules()}
    tokens = np.asarray(tokenizer.encode(TEXT))
    recipe = LoraRecipe(model=str(base_dir), data="", steps=5, seq_len=SEQ_LEN, lr=1e-2).check()
    first, _ = fit(model, tokens, recipe, progress=False)
    assert {name: type(m) for name, m in model.named_modules()} == kinds
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(b.abs().max() > 0 for _, b in first.values())  # B left zero would make the checks above vacuous
    second, _ = fit(model, tokens, recipe, progress=False)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k][i], second[k][i]) for k in first for i in (0, 1))


def test_cli_trains_an_adapter_that_generate_uses(base_dir, text_file, tmp_path):
    out = tmp_path / "qv"
    result = subprocess.run([sys.executable, "-m", "edgellm", "lora", "train", "--model", str(base_dir), "--data",
                             str(text_file), "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj", "--steps",
                             "8", "--seq-len", str(SEQ_LEN), "--batch", "2", "--lr", "1e-2", "--threads", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 8 and summary["trainable_parameters"] == 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32)
    assert "step 8: loss" in result.stderr  # the progress lines
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["q_proj", "v_proj"])
    model, tokenizer = load(base_dir, "fp32")
    load_adapter(model, out)
    want = generate(model, tokenizer, "the cat", max_tokens=6, adapter="qv").tokens
    gen = run_cli("generate", "--model", str(base_dir), "--dtype", "fp32", "--adapter", str(out), "--prompt",
                  "the cat", "--max-tokens", "6", "--json")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["tokens"] == want


def test_quantized_base_is_refused(base_dir, text_file, tmp_path):
    q8 = quantize_checkpoint(base_dir, tmp_path / "q8", "q8_0", dtype="fp32").out_dir
    assert_one_line_error(run_cli("lora", "train", "--model", str(q8), "--data", str(text_file), "--out",
                                  str(tmp_path / "a")), "quantized", "train on the unquantized checkpoint")


@pytest.mark.parametrize(("case", "needles"), [
    ("missing data", ("does not exist",)),
    ("empty data", ("is empty",)),
    ("short data", ("too few for 4 training windows",)),
    ("rank 0", ("--rank must be at least 1",)),
    ("unknown target", ("no projection named qkv_proj",)),
    ("gguf base", ("GGUF", "train on the unquantized checkpoint")),
])
def test_bad_input_is_one_line_error(base_dir, tmp_path, capsys, case, needles):
    data = tmp_path / "data.txt"
    data.write_text({"empty data": " \n", "short data": "the cat sat"}.get(case, TEXT), encoding="utf-8")
    args = {"--model": str(base_dir), "--data": str(data), "--out": str(tmp_path / "out"), "--quiet": None}
    args.update({"missing data": {"--data": str(tmp_path / "nope.txt")}, "rank 0": {"--rank": "0"},
                 "unknown target": {"--targets": "q_proj,qkv_proj"},
                 "gguf base": {"--model": str(tmp_path / "m.gguf")}}.get(case, {}))
    argv = ["lora", "train", *[x for k, v in args.items() for x in (k, v) if x is not None]]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellm: error:"), lines
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()

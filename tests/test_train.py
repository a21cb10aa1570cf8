"""edgellm.train: corpus split, tokenizer, a tiny training run, its HF export and its determinism."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import edgellm
from edgellm.bench.common import torch_threads
from edgellm.train import add_train_arguments, export_checkpoint, make_recipe, run_train, train, trainer
from edgellm.train.corpus import CorpusError, load_corpus, stdlib_root
from edgellm.train.tokenizer import SPECIAL_TOKENS, TokenizerFileError, load_tokenizer_file, train_tokenizer
from edgellm.train.trainer import Recipe, TrainingError, init_model, lr_at

CORPUS_FILES = ("argparse.py", "ast.py", "bisect.py", "calendar.py", "colorsys.py", "copy.py", "csv.py",
                "dataclasses.py", "enum.py", "fnmatch.py", "functools.py", "heapq.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        shutil.copy(stdlib_root() / name, root / name)
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def runs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny runs with the same seed, single-threaded: reproducibility is promised for a fixed thread count,
    and one thread is also the fastest for these tiny GEMMs on a busy machine."""
    recipe = make_recipe("tiny", corpus=str(corpus), steps=20)
    outs = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for out in outs:
            train(recipe, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return outs


def test_stdlib_corpus_split_is_stable_and_skips_tests() -> None:
    first, second = load_corpus(), load_corpus()
    assert first == second
    assert set(first.train).isdisjoint(first.heldout)
    assert 0.005 < len(first.heldout) / (len(first.train) + len(first.heldout)) < 0.05
    parts = {part for f in first.train + first.heldout for part in f.relative_to(first.root).parts[:-1]}
    assert not parts & {"test", "tests", "site-packages"}


def test_small_corpus_still_gets_a_heldout_file(corpus: Path, tmp_path: Path) -> None:
    split = load_corpus(corpus)
    assert len(split.heldout) >= 1 and len(split.train) >= 1
    with pytest.raises(CorpusError):
        load_corpus(tmp_path)


def test_tokenizer_is_deterministic_byte_level_and_prepends_bos(corpus: Path) -> None:
    texts = [f.read_text(encoding="utf-8") for f in sorted(corpus.glob("*.py"))]
    a, b = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert a.to_str() == b.to_str()
    assert [a.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = "def f(x):\n    return x  # ünïcode ✓\n"
    ids = a.encode(text).ids
    assert ids[0] == a.token_to_id("<|bos|>")
    assert a.decode(ids) == text


def test_bad_arguments_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="unknown preset"):
        make_recipe("huge")
    with pytest.raises(TrainingError, match="--steps"):
        make_recipe("tiny", steps=0)
    with pytest.raises(TrainingError, match="--seq-len"):
        make_recipe("tiny", seq_len=10_000)
    with pytest.raises(TokenizerFileError):
        load_tokenizer_file(tmp_path)
    with pytest.raises(TrainingError, match="no checkpoint"):
        export_checkpoint(tmp_path)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    not_a_dir = tmp_path / "file"
    not_a_dir.touch()
    with pytest.raises(TrainingError, match="is a file"):
        train(make_recipe("tiny"), not_a_dir)
    with pytest.raises(TrainingError, match="--minutes"):
        run_train(parser.parse_args(["--out", str(tmp_path), "--preset", "tiny", "--minutes", "0"]))


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    recipe = make_recipe("tiny", steps=100)
    lrs = [lr_at(s, recipe) for s in range(recipe.steps)]
    assert lrs[0] < lrs[recipe.warmup_steps - 1] == pytest.approx(recipe.lr)
    assert lrs[-1] == pytest.approx(recipe.lr * recipe.min_lr_ratio, rel=0.01)
    assert all(a >= b for a, b in zip(lrs[recipe.warmup_steps:], lrs[recipe.warmup_steps + 1:], strict=False))


def test_training_lowers_the_loss_on_a_fixed_batch(runs: tuple[Path, Path], corpus: Path) -> None:
    out = runs[0]
    model, tokenizer = edgellm.load(out, dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    initial = init_model(config, make_recipe("tiny").seed).eval()
    tokens = torch.tensor([tokenizer.encode((corpus / "heapq.py").read_text())[:129]])

    def loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return F.cross_entropy(m(tokens[:, :-1])[0], tokens[0, 1:]).item()

    assert loss(model) < loss(initial) - 0.3
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 20 and summary["tokens_seen"] == 20 * 4 * 64 and not summary["stopped_early"]
    assert math.isfinite(summary["heldout_perplexity"]) and summary["final_train_loss"] < math.log(config["vocab_size"])


def test_export_is_a_real_hf_llama_checkpoint(runs: tuple[Path, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    out = runs[0]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model, tokenizer = edgellm.load(out, dtype="fp32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("import os\n\ndef main(argv):\n    return len(argv)\n")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tokenizer.eos_token_ids == {tokenizer.backend.token_to_id(t) for t in ("<|eos|>", "<|end|>")}


def test_same_seed_gives_identical_weights_and_export_only_reproduces_them(runs: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    a, b = (load_file(str(out / "model.safetensors")) for out in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (runs[0] / "tokenizer.json").read_text() == (runs[1] / "tokenizer.json").read_text()
    copy = shutil.copytree(runs[0], tmp_path / "copy")
    (copy / "model.safetensors").unlink()
    export_checkpoint(copy)
    c = load_file(str(copy / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_run_stopped_by_minutes_resumes_to_the_same_weights(runs: tuple[Path, Path], corpus: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               one_thread: None) -> None:
    recipe = make_recipe("tiny", corpus=str(corpus), steps=20)
    clock = count()  # every clock read is one second, so a 30 s cap stops the run part-way
    monkeypatch.setattr(trainer, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    stopped = train(recipe, tmp_path, minutes=0.5, progress=False)
    assert stopped["stopped_early"] and 0 < stopped["steps"] < recipe.steps
    monkeypatch.undo()
    finished = train(recipe, tmp_path, progress=False)
    assert finished["steps"] == recipe.steps and finished["tokens_seen"] == recipe.steps * recipe.tokens_per_step
    a, b = load_file(str(runs[0] / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_builtin_model_is_the_default_preset_exported() -> None:
    from edgellm.assets import default_model_path

    path = default_model_path()
    assert (path / "model.safetensors").stat().st_size <= 60 * 2**20
    recipe = json.loads((path / "training.json").read_text())["recipe"]
    assert dataclasses.asdict(Recipe(**recipe)) == dataclasses.asdict(make_recipe("default"))  # newer fields: defaults
    model, tokenizer = edgellm.load()
    assert model.args.hidden_size == recipe["hidden_size"] and model.args.tie_word_embeddings
    assert tokenizer.encode("x")[0] == tokenizer.backend.token_to_id("<|bos|>")


@pytest.mark.parametrize("preset", ["moe", "moge"])
def test_moe_presets_train_and_export_a_routed_model(corpus: Path, tmp_path: Path, one_thread, preset: str) -> None:
    """The MoE presets, shrunk: the exported Qwen3-MoE loads in edgellm (and for top-k routing in transformers, with
    the same logits); MoGE gives every expert group the same load by construction; the load-balancing loss joins
    the objective (a zero weight changes the trained router)."""
    small = dict(corpus=str(corpus), steps=6, seq_len=32, batch=2, vocab_size=512, hidden_size=64,
                 intermediate_size=128, expert_size=32, num_hidden_layers=2, max_position_embeddings=64)
    summary = train(make_recipe(preset, **small), tmp_path / "a", progress=False)
    assert summary["heldout_loss"] > 0
    model, tokenizer = edgellm.load(tmp_path / "a", dtype="fp32")
    block = model.model.layers[0].mlp
    assert len(block.experts) == 16 and block.top_k == 4 and block.routing == ("moge" if preset == "moge" else "topk")
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x + 1\n" * 4)])
    seen = []
    block.register_forward_hook(lambda m, a, out: seen.append(a[0]))
    with torch.no_grad():
        got = model(ids)
    x = seen[0].reshape(-1, seen[0].shape[-1])
    if preset == "moge":
        from edgellm.models.moe import grouped_topk
        _, index = grouped_topk(block.gate(x), 4, 1, block.expert_scale)
        load = torch.bincount(index.flatten() // 4, minlength=4)
        assert (load == x.shape[0]).all()  # one expert per group per token: every group's load is the token count
        trained = torch.load(tmp_path / "a" / "checkpoint.pt")["model"]["model.layers.0.mlp.expert_scale"]
        assert not torch.equal(trained, torch.full((16,), 4.0))  # trained (fp32 here; the bf16 export rounds it)
    else:
        transformers = pytest.importorskip("transformers")
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(got, reference(ids).logits, atol=1e-4, rtol=0)
    train(make_recipe(preset, **small, aux_loss=0.0), tmp_path / "b", progress=False)
    other, _ = edgellm.load(tmp_path / "b", dtype="fp32")
    assert not torch.equal(block.gate.weight, other.model.layers[0].mlp.gate.weight)

"""KV Prediction: exactness with a perfect predictor, RoPE positions, layer maps, the loss, errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from edgellm import PromptCache, generate
from edgellm.agents import AgentStore
from edgellm.cli import main
from edgellm.kv.persist import read_metadata
from edgellm.kvpred import KVPredictor, KVPredictorError, default_layer_map, load_predictor, pruned_layers
from edgellm.kvpred.flops import base_ttft_flops, forward_flops, kvpred_ttft_flops
from edgellm.kvpred.predictor import ARTIFACT
from edgellm.kvpred.train import KVPredRecipe, _optimizer, build_predictor, kvpred_losses, trainable_copy
from edgellm.loader import load_model
from edgellm.tokenizer import Tokenizer

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"


def exact_predictor(base) -> KVPredictor:
    """aux = a copy of the base, base layer j fed by aux layer j through identity maps: a perfect predictor."""
    n = base.args.num_hidden_layers
    predictor = KVPredictor(trainable_copy(base), base.args, list(range(n)), {"base_fingerprint": base.fingerprint})
    predictor.init_identity()
    return predictor.eval().requires_grad_(False)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: the base applies its key norm to predicted keys
def test_perfect_predictor_reproduces_base_generation(checkpoint, arch: str) -> None:
    path = checkpoint(arch)
    base, tokenizer = load_model(path, "fp32"), Tokenizer(path)
    predictor = exact_predictor(base)
    plain = generate(base, tokenizer, PROMPT, max_tokens=12)
    predicted = generate(base, tokenizer, PROMPT, max_tokens=12, kv_predictor=predictor)
    assert predicted.tokens == plain.tokens
    ids = tokenizer.encode(PROMPT)
    assert predicted.stats["predicted_tokens"] == len(ids) - 1
    # the predicted cache equals the one a base prefill builds (same positions, norm and rotation)
    true_cache, pred_cache = PromptCache(base, 64), PromptCache(base, 64)
    base(torch.tensor([ids[:-1]]), true_cache.layers)
    predictor.prefill(base, ids[:-1], pred_cache)
    for a, b in zip(true_cache.layers, pred_cache.layers, strict=True):
        torch.testing.assert_close(b.state()["keys"], a.state()["keys"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.state()["values"], a.state()["values"], atol=1e-5, rtol=1e-5)


def hf_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate (heads, seq, dim) the half-split way, written out independently of edgellm.models.rope."""
    dim = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    ang = positions.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1) * sin


def test_predicted_keys_are_rotated_at_their_cache_positions(llama_dir: Path) -> None:
    base, tokenizer = load_model(llama_dir, "fp32"), Tokenizer(llama_dir)
    predictor = exact_predictor(base)
    ids = tokenizer.encode(PROMPT)[:-1]
    keys, _ = predictor.predict(ids)
    heads, dim = base.args.num_key_value_heads, base.args.head_dim
    raw = keys[0][0].view(len(ids), heads, dim).transpose(0, 1)
    expected = hf_rope(raw, torch.arange(len(ids)), base.args.rope_theta)
    cache = PromptCache(base, 64)
    predictor.prefill(base, ids, cache)
    torch.testing.assert_close(cache.layers[0].state()["keys"][0], expected, atol=1e-5, rtol=1e-5)
    # the same K/V written one position later (an off-by-one) must not match, nor give the same first token
    shifted = PromptCache(base, 64)
    base(torch.tensor([ids[:1]]), shifted.layers)
    predictor.prefill(base, ids, shifted)
    assert not torch.allclose(shifted.layers[0].state()["keys"][0, :, 1:], expected, atol=1e-3)
    last = torch.tensor([[tokenizer.encode(PROMPT)[-1]]])
    right = base(last, cache.layers)[0, -1]
    wrong = base(last, shifted.layers)[0, -1]
    assert not torch.allclose(right, wrong, atol=1e-4)


@pytest.mark.parametrize("n_aux,n_base", [(1, 1), (1, 8), (2, 8), (3, 8), (4, 8), (5, 8), (6, 12), (3, 12),
                                          (9, 12), (7, 7), (5, 16)])
def test_default_layer_map_covers_every_base_layer_once_and_uses_every_aux_layer(n_aux: int, n_base: int) -> None:
    layer_map = default_layer_map(n_aux, n_base)
    assert len(layer_map) == n_base and all(0 <= i < n_aux for i in layer_map)
    counts = [layer_map.count(i) for i in range(n_aux)]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)  # early aux layers take the extra base layers
    assert layer_map == sorted(layer_map)
    if n_base == 2 * n_aux:
        assert layer_map == [j // 2 for j in range(n_base)]  # aux layer i feeds base layers 2i and 2i+1
    kept = pruned_layers(n_base, n_aux / n_base)
    assert len(kept) == n_aux and all(layer_map[k] == i for i, k in enumerate(kept))


def test_pruned_fractions_and_too_deep_aux() -> None:
    assert pruned_layers(12, 0.25) == [0, 4, 8]
    assert pruned_layers(12, 0.5) == [0, 2, 4, 6, 8, 10]
    assert pruned_layers(12, 0.75) == [0, 2, 4, 6, 7, 8, 9, 10, 11]
    with pytest.raises(KVPredictorError, match="aux model has 5 layers"):
        default_layer_map(5, 4)
    with pytest.raises(KVPredictorError, match="aux-prune"):
        pruned_layers(12, 1.5)


def _kv_hooks(model, store: dict, replace: dict | None = None) -> list:
    """Forward hooks on HF k_proj/v_proj: record their outputs (pre-norm, pre-RoPE) or swap in others."""
    handles = []
    for j, layer in enumerate(model.model.layers):
        for name in ("k", "v"):
            def hook(_mod, _inp, out, j=j, name=name):
                store[(j, name)] = out
                return replace[(j, name)] if replace is not None else None
            handles.append(getattr(layer.self_attn, f"{name}_proj").register_forward_hook(hook))
    return handles


def test_loss_terms_match_a_transformers_reference(checkpoint) -> None:
    transformers = pytest.importorskip("transformers")
    base_dir, aux_dir = checkpoint("llama", num_hidden_layers=3), checkpoint("llama", num_hidden_layers=2, seed=1,
                                                                              hidden_size=32, num_attention_heads=2,
                                                                              num_key_value_heads=1)
    base = load_model(base_dir, "fp32")
    recipe = KVPredRecipe(base=str(base_dir), aux=str(aux_dir), aux_prune=None, layer_map=None, data=None)
    torch.manual_seed(0)
    predictor = build_predictor(base, Tokenizer(base_dir), recipe)
    assert predictor.layer_map == [0, 0, 1]
    x = torch.randint(0, 300, (2, 12))
    y = torch.randint(0, 300, (2, 12))
    ours = {k: v.item() for k, v in kvpred_losses(base, predictor, x, y).items()}

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    hf_aux = transformers.AutoModelForCausalLM.from_pretrained(aux_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        aux_kv: dict = {}
        handles = _kv_hooks(hf_aux, aux_kv)
        aux_logits = hf_aux(x).logits
        [h.remove() for h in handles]
        true_kv: dict = {}
        handles = _kv_hooks(hf_base, true_kv)
        hf_base(x)
        [h.remove() for h in handles]
        pred = {}
        for j, i in enumerate([0, 0, 1]):
            for name, projs in (("k", predictor.k_proj), ("v", predictor.v_proj)):
                w, b = projs[j].weight, projs[j].bias
                pred[(j, name)] = aux_kv[(i, name)] @ w.T + b
        handles = _kv_hooks(hf_base, {}, replace=pred)
        base_logits = hf_base(x).logits
        [h.remove() for h in handles]
    base_ce = F.cross_entropy(base_logits.flatten(0, 1), y.flatten()).item()
    aux_ce = F.cross_entropy(aux_logits.flatten(0, 1), y.flatten()).item()
    l1 = sum((pred[key] - true_kv[key]).abs().mean().item() for key in pred)
    assert ours["base_ce"] == pytest.approx(base_ce, abs=1e-4)
    assert ours["aux_ce"] == pytest.approx(aux_ce, abs=1e-4)
    assert ours["kv_l1"] == pytest.approx(l1, rel=1e-4)
    assert ours["loss"] == pytest.approx(base_ce + aux_ce + l1, rel=1e-5)


def test_one_training_step_lowers_the_loss(llama_dir: Path) -> None:
    base = load_model(llama_dir, "fp32")
    recipe = KVPredRecipe(base=str(llama_dir), aux=None, aux_prune=0.5, layer_map=None, data=None, lr=1e-3)
    predictor = build_predictor(base, Tokenizer(llama_dir), recipe).train()
    torch.manual_seed(0)
    block = torch.randint(0, 300, (2, 17))
    x, y = block[:, :-1], block[:, 1:]
    optimizer = _optimizer(predictor, recipe)
    before = kvpred_losses(base, predictor, x, y)
    before["loss"].backward()
    optimizer.step()
    after = kvpred_losses(base, predictor, x, y)
    assert after["loss"].item() < before["loss"].item()
    assert all(p.grad is None for p in base.parameters())  # the base stays frozen


def test_bad_predictors_raise_typed_errors(checkpoint, tmp_path: Path) -> None:
    base_dir, other_dir = checkpoint("llama"), checkpoint("llama", seed=3)
    base = load_model(base_dir, "fp32")
    recipe = KVPredRecipe(base=str(base_dir), aux=None, aux_prune=0.5, layer_map=None, data=None)
    predictor = build_predictor(base, Tokenizer(base_dir), recipe)
    file = predictor.save(tmp_path / ARTIFACT)
    load_predictor(file, base, Tokenizer(base_dir).fingerprint)  # fits its own base
    with pytest.raises(KVPredictorError, match="another base model"):
        load_predictor(file, load_model(other_dir, "fp32"))
    with pytest.raises(KVPredictorError, match="different tokenizer"):
        load_predictor(file, base, "0" * 32)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KVPredictorError, match="not a readable KV predictor"):
        load_predictor(tmp_path / "junk.safetensors", base)
    deep = checkpoint("llama", num_hidden_layers=3)
    with pytest.raises(KVPredictorError, match="must not be deeper"):
        build_predictor(base, Tokenizer(base_dir), KVPredRecipe(str(base_dir), str(deep), None, None, None))
    foreign = checkpoint("llama", num_hidden_layers=1)
    tok = HFTokenizer.from_file(str(foreign / "tokenizer.json"))
    tok.add_tokens(["<|another-token|>"])
    tok.save(str(foreign / "tokenizer.json"))
    with pytest.raises(KVPredictorError, match="different tokenizer"):
        build_predictor(base, Tokenizer(base_dir), KVPredRecipe(str(base_dir), str(foreign), None, None, None))
    with pytest.raises(KVPredictorError, match="layer map"):
        build_predictor(base, Tokenizer(base_dir), KVPredRecipe(str(base_dir), None, 0.5, "0,1", None))


def test_ttft_flops_count_aux_maps_and_one_base_step(llama_dir: Path) -> None:
    base = load_model(llama_dir, "fp32").args
    # a pruned aux with all the layers: aux over T-1 tokens + one base token = the base prefill + the maps
    maps = 2 * 2 * 32 * 32 * 2 * 99
    no_logits = forward_flops(base, 99, logits_tokens=0) + forward_flops(base, 1, start=99)
    assert kvpred_ttft_flops(base, base, 100) == pytest.approx(no_logits + maps)
    assert base_ttft_flops(base, 100) == pytest.approx(no_logits)
    # attention grows with the context: token t of a prefill attends to t+1 keys
    assert forward_flops(base, 2) - 2 * forward_flops(base, 1, logits_tokens=0) == pytest.approx(
        2 * 4 * 64 * 1 + 2 * 64 * 384)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(4):
        (root / f"mod{i}.py").write_text("import os\n\n" + "".join(
            f"def f{j}(x):\n    return x * {j} + {i}\n\n" for j in range(30)))
    return root


def test_cli_trains_a_predictor_that_generate_and_agents_use(llama_dir: Path, data_dir: Path, tmp_path: Path,
                                                             checkpoint, capsys) -> None:
    out = tmp_path / "kvp"
    argv = ["kvpred", "train", "--base", str(llama_dir), "--aux-prune", "0.5", "--data", str(data_dir),
            "--steps", "2", "--seq-len", "32", "--batch", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and set(summary["heldout"]) == {"loss", "base_ce", "aux_ce", "kv_l1"}
    with safe_open(out / ARTIFACT, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["layer_map"]) == [0, 0]
    assert json.loads(meta["aux"])["kept_layers"] == [0]
    assert main(argv) == 0  # resumes from the finished checkpoint: nothing left to train
    assert json.loads(capsys.readouterr().out)["steps"] == 2

    store = tmp_path / "agents"
    assert main(["generate", "--model", str(llama_dir), "--dtype", "fp32", "--kv-predictor", str(out),
                 "--prompt", PROMPT, "--max-tokens", "4", "--json", "--agent", "a1", "--store", str(store)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predicted_tokens"] == result["prompt_tokens"] - 1 and len(result["tokens"]) >= 1
    assert read_metadata(store / "a1.safetensors")["predicted"] == "1"
    model = load_model(llama_dir, "fp32")
    agent = AgentStore(store, model, Tokenizer(llama_dir)).agent("a1")
    assert agent.predicted and agent.cache.tokens

    other = tmp_path / "other"
    assert main(["kvpred", "train", "--base", str(llama_dir), "--aux-prune", "0.5", "--data", str(data_dir),
                 "--steps", "1", "--seq-len", "32", "--batch", "1", "--out", str(other), "--quiet",
                 "--layer-map", "0,3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgellm: error:") and "layer map" in err and len(err.strip().splitlines()) == 1
    deep, stranger = checkpoint("llama", num_hidden_layers=3), checkpoint("llama", seed=5)
    capsys.readouterr()  # transformers' save progress bars
    assert main(["kvpred", "train", "--base", str(llama_dir), "--aux", str(deep), "--out", str(other),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "must not be deeper" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--model", str(stranger), "--kv-predictor", str(out),
                 "--prompt", PROMPT, "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "another base model" in err and len(err.strip().splitlines()) == 1


def test_serve_kv_prediction_is_a_per_request_switch(llama_dir: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from edgellm.serve import create_app

    model, tokenizer = load_model(llama_dir, "fp32"), Tokenizer(llama_dir)
    model.name = "tiny"
    store = AgentStore(tmp_path / "agents", model, tokenizer)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    with TestClient(create_app(model, tokenizer, store, kv_predictor=exact_predictor(model))) as client:
        plain = client.post("/v1/completions", json=body).json()
        predicted = client.post("/v1/completions", json={**body, "kv_prediction": True}).json()
        assert predicted["choices"][0]["text"] == plain["choices"][0]["text"]  # a perfect predictor changes nothing
        client.post("/v1/completions", json={**body, "kv_prediction": True}, headers={"X-Agent-Id": "p1"})
        client.post("/v1/completions", json=body, headers={"X-Agent-Id": "n1"})
    assert read_metadata(tmp_path / "agents" / "p1.safetensors")["predicted"] == "1"
    assert read_metadata(tmp_path / "agents" / "n1.safetensors")["predicted"] == "0"
    with TestClient(create_app(model, tokenizer, AgentStore(tmp_path / "b", model, tokenizer))) as client:
        refused = client.post("/v1/completions", json={**body, "kv_prediction": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "kv_prediction"


def test_bench_kvpred_table_json_and_plot(llama_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    base, tokenizer = load_model(llama_dir, "fp32"), Tokenizer(llama_dir)
    perfect = exact_predictor(base)
    perfect.meta["tokenizer_fingerprint"] = tokenizer.fingerprint
    perfect.save(tmp_path / "perfect" / ARTIFACT)
    recipe = KVPredRecipe(base=str(llama_dir), aux=None, aux_prune=0.5, layer_map=None, data=None)
    build_predictor(base, tokenizer, recipe).save(tmp_path / "half.safetensors")
    out, png = tmp_path / "bench.json", tmp_path / "pareto.png"
    assert main(["bench", "kvpred", "--base", str(llama_dir), "--dtype", "fp32", "--predictors",
                 f"{tmp_path / 'perfect'},{tmp_path / 'half.safetensors'}", "--lengths", "16,40", "--reps", "1",
                 "--data", str(data_dir), "--windows", "2", "--prompt-tokens", "12", "--continuation", "4",
                 "--code-examples", "3", "--code-context", "24", "--json", str(out), "--plot", str(png)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["methods"]}
    assert list(rows) == ["base", "kvpred:perfect", "aux-alone:perfect", "kvpred:half", "aux-alone:half",
                          "pruned-base:0.5"]
    assert rows["base"]["greedy_agreement"] == rows["base"]["first_token_agreement"] == 1.0
    assert rows["base"]["greedy_common_prefix"] == 4
    for key in ("next_token_accuracy", "perplexity", "first_token_agreement", "greedy_agreement",
                "greedy_common_prefix", "code_exact_match"):
        assert rows["kvpred:perfect"][key] == pytest.approx(rows["base"][key], rel=1e-3)
    # an untrained pruned aux alone is the pruned base: same quality, same FLOPs
    assert rows["aux-alone:half"]["perplexity"] == pytest.approx(rows["pruned-base:0.5"]["perplexity"], rel=1e-4)
    assert rows["kvpred:half"]["ttft_flops_vs_base"]["40"] < 1.0 == rows["base"]["ttft_flops_vs_base"]["40"]
    # the exact predictor spends more FLOPs than its aux (the base itself) alone for the same quality
    versus = json.loads(out.read_text())["vs_baselines"]
    assert versus["length"] == 40 and "aux-alone:perfect" in versus["predictors"]["kvpred:perfect"]["dominated_by"]
    assert versus["predictors"]["kvpred:perfect"]["next_token_accuracy"]["baseline_value"] == \
        max(r["next_token_accuracy"] for r in rows.values() if r["kind"] in ("aux", "pruned"))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_stopped_run_resumes_to_the_same_predictor(llama_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from edgellm.kvpred.train import train_predictor

    recipe = KVPredRecipe(base=str(llama_dir), aux=None, aux_prune=0.5, layer_map=None, data=str(data_dir),
                          steps=3, seq_len=16, batch=1, warmup_steps=1)
    train_predictor(recipe, tmp_path / "straight", progress=False)
    assert train_predictor(recipe, tmp_path / "resumed", minutes=1e-9, progress=False)["steps"] == 0
    assert train_predictor(recipe, tmp_path / "resumed", progress=False)["steps"] == 3
    straight, resumed = load_file(tmp_path / "straight" / ARTIFACT), load_file(tmp_path / "resumed" / ARTIFACT)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not torch.equal(straight["k_proj.0.weight"], torch.eye(32))  # it did train
    with pytest.raises(KVPredictorError, match="different recipe"):
        train_predictor(KVPredRecipe(**{**recipe.__dict__, "lr": 1e-2}), tmp_path / "resumed", progress=False)


def test_chat_with_a_perfect_predictor_answers_as_without(llama_dir: Path, tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    base, tokenizer = load_model(llama_dir, "fp32"), Tokenizer(llama_dir)
    perfect = exact_predictor(base)
    perfect.meta["tokenizer_fingerprint"] = tokenizer.fingerprint
    perfect.save(tmp_path / "perfect.safetensors")
    calls, prefill = [], KVPredictor.prefill
    monkeypatch.setattr(KVPredictor, "prefill",
                        lambda self, *a, **k: calls.append(k["start"]) or prefill(self, *a, **k))
    outputs = []
    for extra in ([], ["--kv-predictor", str(tmp_path / "perfect.safetensors")]):
        turns = iter(["hello there", "and again", ""])
        monkeypatch.setattr("builtins.input", lambda _prompt, turns=turns: next(turns))
        assert main(["chat", "--model", str(llama_dir), "--dtype", "fp32", "--max-tokens", "5", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()
    assert len(calls) == 2 and calls[0] == 0 < calls[1]  # the second turn predicts only past the reused prefix

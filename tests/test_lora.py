"""PEFT LoRA adapters on edgellm models, checked against PEFT's own PeftModel on the transformers model."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import peft
import pytest
import torch
import transformers

from edgellm.agents import AgentStore
from edgellm.cli import build_parser
from edgellm.errors import CheckpointError, InvalidRequestError
from edgellm.generate import batch_generate, generate
from edgellm.kernels import Linear
from edgellm.kv import BlockPool, KVFormat
from edgellm.kv.persist import read_metadata
from edgellm.kv.prompt_cache import PromptCache
from edgellm.loader import load
from edgellm.models.lora import LoraLinear, adapters, load_adapter, read_adapter, select
from edgellm.quant.convert import quantize_checkpoint
from edgellm.sequence import Sequence
from tests.conftest import build_checkpoint
from tests.test_errors import assert_one_line_error, run_cli
from tests.test_serve import Server, batched_steps

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: LoraConfig arguments (target_modules as a list or as PEFT's regex)
    "all": dict(r=8, lora_alpha=16, target_modules=ALL),
    "qv-rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=r".*\.(q_proj|v_proj)"),
    "mlp": dict(r=16, lora_alpha=32, target_modules=["gate_proj", "down_proj"]),
}


def hf_model(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def make_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    """A PEFT adapter with random A and B (init_lora_weights=False), so it changes the logits."""
    torch.manual_seed(seed)
    lora = peft.get_peft_model(hf_model(base), peft.LoraConfig(init_lora_weights=False, **config))
    lora.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_dirs(llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(llama_dir, root / name, seed, **config)
            for seed, (name, config) in enumerate(ADAPTERS.items())}


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def peft_model(base: Path, adapter: Path) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_logits_match_peft(llama_dir, lora_dirs, name):
    model, _ = load(llama_dir, "fp32")
    prompt = ids(24, 1)
    with torch.no_grad():
        base = model(prompt)
        load_adapter(model, lora_dirs[name])
        with select(model, [name]):
            ours = model(prompt)
        ref = peft_model(llama_dir, lora_dirs[name])(prompt).logits
    assert (ref - base).abs().max() > 1e-2  # the adapter matters
    assert (ours - ref).abs().max() <= 1e-4


def test_greedy_generate_matches_peft_and_base_keeps_fused_step(llama_dir, lora_dirs):
    """Batch-1 decode runs the fused native step, for the base and with an adapter (its side path inside the step)."""
    model, tokenizer = load(llama_dir, "fp32")
    plain = generate(model, tokenizer, ids(12, 2)[0].tolist(), max_tokens=16).tokens
    load_adapter(model, lora_dirs["all"])
    ours = generate(model, tokenizer, ids(12, 2)[0].tolist(), max_tokens=16, adapter="all").tokens
    ref = peft_model(llama_dir, lora_dirs["all"]).generate(ids(12, 2), max_new_tokens=16, do_sample=False)
    assert ours == ref[0, 12:].tolist()
    assert ours != plain
    assert generate(model, tokenizer, ids(12, 2)[0].tolist(), max_tokens=16).tokens == plain
    assert model.__dict__.get("_fused")  # the base's decode went through the fused step, adapters resident


def test_quantized_base(llama_dir, lora_dirs, tmp_path):
    """q8_0 base: each wrapped projection adds exactly the LoRA delta to the quantized layer's output, and the logits
    are as close to PEFT on the dequantized weights as the quantized base alone is to those weights."""
    q8 = tmp_path / "q8"
    quantize_checkpoint(llama_dir, q8, "q8_0", dtype="fp32")
    model, _ = load(q8, "fp32")
    hf = hf_model(llama_dir)
    for name, module in model.named_modules():
        if hasattr(module, "weight_view"):
            hf.get_submodule(name).weight.data = module.weight_view.dequantize()
    prompt = ids(24, 3)
    with torch.no_grad():
        gap = (model(prompt) - hf(prompt).logits).abs().max().item()
        load_adapter(model, lora_dirs["all"])
        with select(model, ["all"]):
            ours = model(prompt)
        ref = peft.PeftModel.from_pretrained(hf, lora_dirs["all"]).eval()(prompt).logits
        proj = model.get_submodule("model.layers.1.mlp.down_proj")
        a, b, scale = proj.lora["all"]
        x = torch.randn(3, 5, proj.in_features)
        with select(model, ["all"]):
            exact = (proj(x) - proj.base(x) - scale * (x @ a.T) @ b.T).abs().max()
    assert exact <= 1e-5
    assert (ours - ref).abs().max() <= max(1e-4, 2 * gap)


@pytest.mark.parametrize("native", [True, False])
def test_batch_mixing_adapters_equals_each_alone(llama_dir, lora_dirs, monkeypatch, native):
    """Rows with three different adapters and none, in one forward and in batched greedy decoding; through the
    native gather kernel and through the stacked matmuls it replaces."""
    if not native:
        monkeypatch.setattr("edgellm.models.lora.lora_bgmv", lambda *args: False)
    model, tokenizer = load(llama_dir, "fp32")
    for path in lora_dirs.values():
        load_adapter(model, path)
    names = ["mlp", None, "all", "qv-rslora"]
    batch = torch.cat([ids(10, 10 + i) for i in range(4)])
    with torch.no_grad():
        with select(model, names):
            together = model(batch)
        for i, name in enumerate(names):
            with select(model, [name]):
                assert (together[i] - model(batch[i:i + 1])[0]).abs().max() <= 1e-5
    prompts = [ids(6 + 3 * i, 20 + i)[0].tolist() for i in range(4)]  # different lengths: own positions per row
    results = batch_generate(model, tokenizer, prompts, max_tokens=10, adapters=names)
    for prompt, name, result in zip(prompts, names, results, strict=True):
        assert result.tokens == generate(model, tokenizer, prompt, max_tokens=10, adapter=name).tokens


def test_memory_and_unload_gives_the_base_back(llama_dir, lora_dirs):
    model, _ = load(llama_dir, "fp32")
    prompt = ids(8, 4)
    with torch.no_grad():
        base = model(prompt)
        load_adapter(model, lora_dirs["all"])
        assert adapters(model).nbytes == read_adapter(lora_dirs["all"]).nbytes  # resident once: the file's tensors
        with pytest.raises(InvalidRequestError, match="KV predictor"):
            Sequence(model, None, [1, 2], PromptCache(model, 8), 2, kv_predictor=model, adapter="all")
        load_adapter(model, lora_dirs["mlp"])
        adapters(model).remove("all")
        assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), LoraLinear)
        assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is Linear
        adapters(model).remove("mlp")
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        assert torch.equal(model(prompt), base)
    with pytest.raises(InvalidRequestError, match="unknown adapter 'all'"):
        generate(model, None, prompt[0].tolist(), max_tokens=2, adapter="all")


@pytest.mark.parametrize("change", [dict(intermediate_size=96), dict(num_hidden_layers=3)])
def test_adapter_from_another_base_is_refused(llama_dir, tmp_path, change):
    other = build_checkpoint(tmp_path / "other", "llama", **change)
    adapter = make_adapter(other, tmp_path / "adapter", 0, r=4, lora_alpha=8, target_modules=ALL)
    model, _ = load(llama_dir, "fp32")
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapter(model, adapter)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing half-applied


@pytest.mark.parametrize(("key", "value"), [
    ("peft_type", "PREFIX_TUNING"), ("modules_to_save", ["lm_head"]), ("use_dora", True), ("bias", "all"),
    ("fan_in_fan_out", True), ("layers_to_transform", [0]), ("rank_pattern", {"q_proj": 4}), ("r", "8"),
    ("lora_alpha", 0), ("target_modules", 3)])
def test_bad_adapter_config_is_refused(llama_dir, lora_dirs, tmp_path, key, value):
    bad = shutil.copytree(lora_dirs["all"], tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    model, _ = load(llama_dir, "fp32")
    with pytest.raises(CheckpointError, match=key) as info:
        load_adapter(model, bad)
    assert "\n" not in str(info.value)


def test_server_batches_requests_with_different_adapters(llama_dir, lora_dirs, tmp_path):
    """Through the openai client: adapters chosen by model name or by field, in flight together, each answer equal
    to the same request alone (a prefix cached under one adapter is not reused under another)."""
    srv = Server(llama_dir, tmp_path, adapters={"sql": lora_dirs["all"], "mlp": lora_dirs["mlp"]}, max_concurrency=8,
                 prefill_chunk=32)
    try:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == [srv.model, f"{srv.model}:sql", f"{srv.model}:mlp"]
        choices = [(srv.model, None), (f"{srv.model}:sql", None), (srv.model, "mlp")]
        jobs = [(f"line {i}: import os", *choice) for i in range(4) for choice in choices]  # each prompt thrice

        def run(job: tuple[str, str, str | None]) -> str:
            prompt, model, adapter = job
            extra = {"adapter": adapter} if adapter else None
            chunks = srv.client().completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                     stream=True, extra_body=extra)
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)

        alone = [run(job) for job in jobs]
        before = batched_steps(srv.url)
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(run, jobs))
        assert together == alone
        assert batched_steps(srv.url) > before  # some decode steps really ran several sequences (and adapters) at once
        assert len({alone[0], alone[1], alone[2]}) == 3  # the adapters change the answer
        with pytest.raises(openai.NotFoundError, match="adapter 'nope' is not loaded"):
            client.completions.create(model=f"{srv.model}:nope", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="adapter") as info:
            client.completions.create(model=srv.model, prompt="x", max_tokens=2, extra_body={"adapter": "nope"})
        assert info.value.body["param"] == "adapter"
    finally:
        srv.stop()


def test_cli_generate_with_adapter(llama_dir, lora_dirs, tmp_path):
    model, tokenizer = load(llama_dir, "fp32")
    load_adapter(model, lora_dirs["all"])
    want = generate(model, tokenizer, "def f(x):", max_tokens=6, adapter="all").tokens
    result = run_cli("generate", "--model", str(llama_dir), "--dtype", "fp32", "--adapter", str(lora_dirs["all"]),
                     "--prompt", "def f(x):", "--max-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == want
    bad = shutil.copytree(lora_dirs["all"], tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert_one_line_error(run_cli("generate", "--model", str(llama_dir), "--adapter", str(bad), "--prompt", "x"),
                          "use_dora")


def test_server_loads_and_unloads_adapters_at_run_time(llama_dir, lora_dirs, tmp_path):
    model, tokenizer = load(llama_dir, "fp32")
    tokenizer.eos_token_ids = set()  # as the test server's
    load_adapter(model, lora_dirs["all"], "sql")
    want = generate(model, tokenizer, "import os", max_tokens=8, adapter="sql").text
    base = generate(model, tokenizer, "def f(x):", max_tokens=40).text
    srv = Server(llama_dir, tmp_path, max_concurrency=4)
    try:
        client = srv.client()
        with ThreadPoolExecutor(1) as pool:  # a base request streams on while the adapter loads
            running = pool.submit(lambda: client.completions.create(model=srv.model, prompt="def f(x):",
                                                                    max_tokens=40, temperature=0).choices[0].text)
            loaded = httpx.post(f"{srv.url}/v1/adapters", json={"name": "sql", "path": str(lora_dirs["all"])})
            assert loaded.status_code == 200, loaded.text
            assert running.result() == base
        assert loaded.json()["bytes"] == read_adapter(lora_dirs["all"]).nbytes
        answer = client.completions.create(model=f"{srv.model}:sql", prompt="import os", max_tokens=8, temperature=0)
        assert answer.choices[0].text == want
        assert httpx.delete(f"{srv.url}/v1/adapters/sql").status_code == 200
        assert httpx.delete(f"{srv.url}/v1/adapters/sql").status_code == 404
        assert [m.id for m in client.models.list().data] == [srv.model]
        wrong = httpx.post(f"{srv.url}/v1/adapters", json={"name": "x", "path": str(tmp_path / "none")})
        assert wrong.status_code == 400 and "does not exist" in wrong.json()["error"]["message"]
    finally:
        srv.stop()


def test_bf16_model_mixes_adapters_in_one_batch(llama_dir, lora_dirs):
    """bf16: adapters stored in the model's dtype; a mixed batch's rows equal each adapter alone, and are as close to
    PEFT's fp32 logits as bf16 allows."""
    model, _ = load(llama_dir, "bf16")
    prompt = torch.cat([ids(12, 5), ids(12, 6)])
    with torch.no_grad():
        plain = model(prompt[:1]).float()
    load_adapter(model, lora_dirs["all"])
    load_adapter(model, lora_dirs["mlp"])
    with torch.no_grad():
        with select(model, ["all", "mlp"]):
            mixed = model(prompt).float()
        with select(model, ["all"]):
            alone = model(prompt[:1]).float()
        ref = peft_model(llama_dir, lora_dirs["all"])(prompt[:1]).logits
    assert model.get_submodule("model.layers.0.self_attn.q_proj").lora_a.dtype == torch.bfloat16
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None  # fused q/k/v and gate/up stay: paths add into them
    adapters(model).remove("all")
    adapters(model).remove("mlp")
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    with torch.no_grad():
        assert (model(prompt[:1]).float() - plain).abs().max() == 0
    assert (mixed[:1] - alone).abs().max() <= 1e-2
    assert (alone - ref).abs().max() <= 5e-2


def test_serve_adapter_arguments():
    args = build_parser().parse_args(["serve", "--adapter", "sql=a/sql", "--adapter", "chat=b"])
    assert args.adapter == [("sql", "a/sql"), ("chat", "b")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--adapter", "a/sql"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_native_bgmv_matches_the_plain_reference(dtype, weights, tokens):
    """One call for the projections of a fused output (q/k/v-like: different ranks, widths, adapter counts, one
    without any adapter on some rows): y[..., columns of p] += scale_pi · (x_i A_ps^T) B_ps^T per row i with its own
    slot s (-1: none), against plain PyTorch in fp32; rows sharing an adapter run together in the kernel."""
    from edgellm.kernels.linear import lora_bgmv
    gen = torch.Generator().manual_seed(0)
    k, rows = 67, 6
    specs = [(8, 3, 300, 0), (4, 2, 37, 300), (16, 1, 90, 350)]  # (rank, adapters, N, first column) per projection
    width = 450  # columns 337..349 and 440.. belong to no projection: untouched
    slots = torch.tensor([[2, -1, 0, 1, 2, 2], [1, 1, -1, -1, 0, 1], [-1, -1, -1, 0, 0, 0]])
    scales = torch.tensor([[0.5, 0.0, 2.0, -1.0, 0.25, 0.25], [1.5, 1.5, 0.0, 0.0, -2.0, 1.5],
                           [0.0, 0.0, 0.0, 3.0, 3.0, 3.0]])
    a = [torch.randn(n_ad * r, k, generator=gen).to(weights) for r, n_ad, _, _ in specs]
    b = [torch.randn(n, n_ad * r, generator=gen).to(weights) for r, n_ad, n, _ in specs]  # B side by side
    x = torch.randn(rows, tokens, k, generator=gen).to(dtype)
    y = torch.randn(rows, tokens, width, generator=gen).to(dtype)
    before = y.clone()
    want = y.float().clone()
    for p, (r, _, n, first) in enumerate(specs):
        for i, s in enumerate(slots[p].tolist()):
            if s >= 0:
                ranks = slice(s * r, (s + 1) * r)
                want[i, :, first:first + n] += scales[p, i] * (x[i].float() @ a[p][ranks].float().T) @ \
                    b[p][:, ranks].float().T
    if not lora_bgmv(y, x, a, [t.t().contiguous() for t in b], slots, scales, [r for r, *_ in specs],
                     [first for *_, first in specs]):
        pytest.skip("native kernel unavailable")
    tol = 1e-4 if dtype == torch.float32 else 0.1  # bf16 y: the sum is rounded once, to bf16
    assert (y.float() - want).abs().max() <= tol * max(1.0, want.abs().max().item() / 10)
    assert torch.equal(y[..., 337:350], before[..., 337:350]) and torch.equal(y[..., 440:], before[..., 440:])
    # rows without an adapter on a projection: its columns left exactly as they were
    assert torch.equal(y[1, :, :300], before[1, :, :300]) and torch.equal(y[2, :, 300:], before[2, :, 300:])
    if dtype == torch.bfloat16:  # the fp32 sum rounded once as torch rounds: the same call on fp32 x and y, cast
        y32 = before.float()
        lora_bgmv(y32, x.float(), a, [t.t().contiguous() for t in b], slots, scales, [r for r, *_ in specs],
                  [first for *_, first in specs])
        assert torch.equal(y, y32.to(dtype))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_batch_takes_one_native_call_per_fused_output(llama_dir, lora_dirs, monkeypatch, dtype):
    """A decode batch mixing adapters of different ranks and targets (q/v only, gate/down only, all, none) makes one
    native call per fused q/k/v or gate/up output (bf16 fuses them) and per other projection, and each row equals
    the plain PyTorch path (the stacked matmuls) on that row alone."""
    from edgellm.kv.batch import batch_layers
    from edgellm.models import lora
    model, _ = load(llama_dir, dtype)
    for path in lora_dirs.values():
        load_adapter(model, path)
    calls = []
    native = lora.lora_bgmv
    monkeypatch.setattr(lora, "lora_bgmv", lambda y, x, *args: calls.append(len(args[0])) or native(y, x, *args))
    names = ["qv-rslora", "mlp", None, "all"]
    batch = torch.cat([ids(1, 30 + i) for i in range(4)])
    with torch.no_grad():
        with select(model, names):
            together = model(batch, batch_layers([PromptCache(model, 8).layers for _ in names]))
        if not calls:
            pytest.skip("native kernel unavailable")
        layers = len(model.model.layers)
        fused = [3] * layers + [2] * layers + [1] * 2 * layers  # q/k/v, gate/up, o, down
        assert sorted(calls) == sorted(fused if dtype == "bf16" else [1] * 7 * layers)
        monkeypatch.setattr(lora, "lora_bgmv", lambda *args: False)
        monkeypatch.setenv("EDGELLM_FUSED_STEP", "0")
        for i, name in enumerate(names):
            with select(model, [name]):
                alone = model(batch[i:i + 1], PromptCache(model, 8).layers)
            assert (together[i] - alone[0]).abs().max() <= (1e-5 if dtype == "fp32" else 2e-2)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "q8_0", "int4-g32"])
def test_fused_step_applies_the_selected_adapter(llama_dir, lora_dirs, tmp_path, monkeypatch, fmt):
    """One decode step with an adapter (or two adapters in turn, then none) through the fused native step equals the
    op-at-a-time forward on the same cache state, dense and quantized bases."""
    from edgellm.kv.prompt_cache import PromptCache
    from edgellm.models import fused
    path = llama_dir
    if fmt in ("q8_0", "int4-g32"):
        path = tmp_path / fmt
        quantize_checkpoint(llama_dir, path, fmt, dtype="fp32")
    model, _ = load(path, "bf16" if fmt == "bf16" else "fp32")
    load_adapter(model, lora_dirs["all"])
    load_adapter(model, lora_dirs["mlp"])
    prompt = ids(9, 4)
    tol = 5e-2 if fmt == "bf16" else 1e-4
    for name in ("all", "mlp", None, "all"):
        cache = PromptCache(model, 32)
        with torch.no_grad(), select(model, [name]):
            model(prompt, cache.layers)
            token = torch.tensor([[7]])
            monkeypatch.setenv("EDGELLM_FUSED_STEP", "1")
            ours = fused.decode_step(model, token, cache.layers)
            assert ours is not None, "the fused step declined"
            for layer in cache.layers:
                layer.trim(1)
            monkeypatch.setenv("EDGELLM_FUSED_STEP", "0")
            ref = model(token, cache.layers)
        assert (ours.float() - ref.float()).abs().max() <= tol, name


def adapted_model(llama_dir: Path, loaded: dict[str, Path]) -> tuple[torch.nn.Module, object]:
    """An fp32 model with `loaded` adapters (name: directory) resident and EOS off, so answers have fixed lengths."""
    model, tokenizer = load(llama_dir, "fp32")
    tokenizer.eos_token_ids = set()
    for name, path in loaded.items():
        load_adapter(model, path, name)
    return model, tokenizer


def test_agent_with_adapter_answers_as_generate_across_turns_and_restores(llama_dir, lora_dirs, tmp_path):
    model, tok = adapted_model(llama_dir, {"all": lora_dirs["all"], "mlp": lora_dirs["mlp"]})
    first = ids(10, 30)[0].tolist()
    agent = AgentStore(tmp_path, model, tok).agent("bob", "all")
    one = agent.generate(first, 8)
    assert one.tokens == generate(model, tok, first, 8, adapter="all").tokens
    assert one.tokens != generate(model, tok, first, 8).tokens  # the adapter matters
    second = [*first, *one.tokens, *ids(5, 31)[0].tolist()]
    two = agent.generate(second, 8)
    assert two.cached_tokens == len(first) + 7 and two.tokens == generate(model, tok, second, 8, adapter="all").tokens
    agent.save()
    meta = read_metadata(tmp_path / "bob.safetensors")
    assert meta["adapter"] == "all" and meta["adapter_fingerprint"] == read_adapter(lora_dirs["all"]).fingerprint

    restored = AgentStore(tmp_path, model, tok).agent("bob")  # no adapter named: the one its memory was made with
    assert restored.adapter == "all" and restored.cache.tokens == agent.cache.tokens
    third = [*second, *two.tokens, *ids(4, 32)[0].tolist()]
    three = restored.generate(third, 8)
    assert three.cached_tokens == len(second) + 7
    assert three.tokens == generate(model, tok, third, 8, adapter="all").tokens


def test_agent_under_another_adapter_is_refused_and_its_file_kept(llama_dir, lora_dirs, tmp_path):
    same = shutil.copytree(lora_dirs["all"], tmp_path / "same")  # the same weights under another name
    model, tok = adapted_model(llama_dir, {"all": lora_dirs["all"], "mlp": lora_dirs["mlp"], "same": same})
    prompt = ids(9, 40)[0].tolist()
    store = AgentStore(tmp_path / "agents", model, tok)
    bob = store.agent("bob", "all")
    bob.generate(prompt, 4)
    bob.save()
    carl = store.agent("carl")
    carl.generate(prompt, 4)
    carl.save()
    with pytest.raises(InvalidRequestError, match=r"^agent 'bob' was made with adapter 'all'; use that adapter or "
                                                  r"another agent$"):
        store.agent("bob", "mlp")  # live
    files = {name: store.path(name).read_bytes() for name in ("bob", "carl")}

    fresh = AgentStore(tmp_path / "agents", model, tok)
    with pytest.raises(InvalidRequestError, match=r"^agent 'bob' was made with adapter 'all'; use that adapter"):
        fresh.acquire("bob", "mlp")
    with pytest.raises(InvalidRequestError, match=r"^agent 'carl' was made without an adapter; drop the adapter"):
        fresh.agent("carl", "all")
    assert not fresh.live and {n: fresh.path(n).read_bytes() for n in files} == files
    follow = [*prompt, *ids(3, 41)[0].tolist()]
    renamed = fresh.agent("bob", "same")  # judged by weights, not name
    assert renamed.adapter == "same" and renamed.generate(follow, 6).tokens == generate(
        model, tok, follow, 6, adapter="all").tokens

    other, _ = adapted_model(llama_dir, {"all": lora_dirs["mlp"]})  # another adapter under bob's adapter's name
    with pytest.raises(InvalidRequestError, match="another version of adapter 'all'"):
        AgentStore(tmp_path / "agents", other, tok).agent("bob")
    bare, _ = adapted_model(llama_dir, {})
    with pytest.raises(InvalidRequestError, match="made with adapter 'all', which is not loaded"):
        AgentStore(tmp_path / "agents", bare, tok).agent("bob")
    only_copy, _ = adapted_model(llama_dir, {"same": same})
    assert AgentStore(tmp_path / "agents", only_copy, tok).agent("bob").adapter == "same"  # its default, renamed
    assert store.path("carl").read_bytes() == files["carl"]


def test_adapted_agent_never_shares_pool_blocks(llama_dir, lora_dirs, tmp_path):
    """In a block pool an adapted agent adopts no published block and publishes none (also after a restore); a fork
    inherits its adapter. Answers equal generate() with the adapter on a contiguous cache."""
    model, tok = adapted_model(llama_dir, {"all": lora_dirs["all"]})
    probe = BlockPool(model.args, KVFormat.parse("fp32"), 1 << 20, 16)
    store = AgentStore(tmp_path, model, tok, "fp32", pool_bytes=200 * probe.block_bytes, block_tokens=16)
    system = ids(3 * 16 + 5, 50)[0].tolist()

    def blocks(name: str) -> set[int]:
        return {b for layer in store.live[name].cache.layers for b in layer.table}

    store.agent("plain").generate([*system, *ids(4, 51)[0].tolist()], 3)
    published = set(store.pool.published)
    assert len(published) == 3 * model.args.num_hidden_layers
    question = [*system, *ids(4, 52)[0].tolist()]
    result = store.agent("ad", "all").generate(question, 6)
    assert result.cached_tokens == 0 and result.tokens == generate(model, tok, question, 6, adapter="all").tokens
    assert not blocks("ad") & blocks("plain") and set(store.pool.published) == published
    second = store.agent("ad2", "all").generate(question, 6)  # the same adapter: still nothing shared
    assert second.cached_tokens == 0 and second.tokens == result.tokens and not blocks("ad") & blocks("ad2")

    store.evict("ad")
    restored = store.agent("ad")
    assert restored.adapter == "all" and not blocks("ad") & (blocks("plain") | blocks("ad2"))
    follow = [*question, *result.tokens, *ids(3, 53)[0].tolist()]
    kid = store.fork("ad", "kid")
    assert kid.adapter == "all"
    assert kid.generate(follow, 5).tokens == generate(model, tok, follow, 5, adapter="all").tokens
    assert set(store.pool.published) == published
    plain = store.agent("plain2").generate(question, 2)
    assert plain.cached_tokens == 3 * 16  # plain agents still share the plain agent's blocks


def test_server_agent_with_adapter(llama_dir, lora_dirs, tmp_path):
    """An agent named by `user` with an adapter in extra_body; later turns name none and get it; another is 400;
    /v1/agents shows it; unloading the adapter writes the idle agent back to disk until it is loaded again."""
    model, tok = adapted_model(llama_dir, {"sql": lora_dirs["all"]})
    prompts = ["import os\n", "\ndef main():", "\n    return"]
    srv = Server(llama_dir, tmp_path, kv_format="fp32", adapters={"sql": lora_dirs["all"], "mlp": lora_dirs["mlp"]})
    try:
        client = srv.client()
        texts, text = [], ""
        for i, extra in enumerate([{"adapter": "sql"}, None]):
            text += prompts[i]
            answer = client.completions.create(model=srv.model, prompt=text, max_tokens=8, temperature=0,
                                               user="bob", extra_body=extra)
            assert answer.choices[0].text == generate(model, tok, text, 8, adapter="sql").text
            texts.append(answer.choices[0].text)
            text += answer.choices[0].text
        assert answer.usage.prompt_tokens_details.cached_tokens > 0
        assert texts[0] != generate(model, tok, prompts[0], 8).text  # the adapter matters
        client.completions.create(model=srv.model, prompt="x", max_tokens=2, user="carl")
        file = tmp_path / "bob.safetensors"
        saved = file.read_bytes()  # bob's save is done: the engine saves before it takes the next request
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="agent 'bob' was made with adapter 'sql'; use that "
                                                             "adapter or another agent") as info:
                client.completions.create(model=f"{srv.model}:mlp", prompt=text, max_tokens=2, user="bob",
                                          stream=stream)
            assert info.value.body["param"] == "adapter"
        with pytest.raises(openai.BadRequestError, match="agent 'carl' was made without an adapter"):
            client.completions.create(model=srv.model, prompt="x y", max_tokens=2, user="carl",
                                      extra_body={"adapter": "sql"})
        assert file.read_bytes() == saved
        agents = {a["name"]: a for a in httpx.get(f"{srv.url}/v1/agents").json()["data"]}
        assert agents["bob"]["adapter"] == "sql" and agents["bob"]["live"] and agents["carl"]["adapter"] is None

        assert httpx.delete(f"{srv.url}/v1/adapters/sql").status_code == 200
        bob = httpx.get(f"{srv.url}/v1/agents/bob").json()
        assert not bob["live"] and bob["adapter"] == "sql" and read_metadata(file)["adapter"] == "sql"
        with pytest.raises(openai.BadRequestError, match="made with adapter 'sql', which is not loaded"):
            client.completions.create(model=srv.model, prompt=text, max_tokens=2, user="bob")
        loaded = httpx.post(f"{srv.url}/v1/adapters", json={"name": "sql", "path": str(lora_dirs["all"])})
        assert loaded.status_code == 200, loaded.text
        text += prompts[2]
        answer = client.completions.create(model=srv.model, prompt=text, max_tokens=8, temperature=0, user="bob")
        assert answer.choices[0].text == generate(model, tok, text, 8, adapter="sql").text
        assert answer.usage.prompt_tokens_details.cached_tokens > 0  # restored from disk under its adapter
    finally:
        srv.stop()


def test_cli_agent_with_adapter(llama_dir, lora_dirs, tmp_path):
    model, tok = load(llama_dir, "fp32")
    load_adapter(model, lora_dirs["all"])
    store = tmp_path / "agents"
    common = ["--model", str(llama_dir), "--dtype", "fp32", "--agent", "bob", "--store", str(store), "--max-tokens",
              "6"]
    result = run_cli("generate", *common, "--adapter", str(lora_dirs["all"]), "--prompt", "def f(x):", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == generate(model, tok, "def f(x):", max_tokens=6, adapter="all").tokens
    saved = (store / "bob.safetensors").read_bytes()
    assert_one_line_error(run_cli("generate", *common, "--adapter", str(lora_dirs["mlp"]), "--prompt", "x"),
                          "agent 'bob' was made with adapter 'all'; use that adapter or another agent")
    assert_one_line_error(run_cli("generate", *common, "--prompt", "x"), "which is not loaded")
    assert (store / "bob.safetensors").read_bytes() == saved

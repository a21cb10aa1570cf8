"""MoE GGUF files (qwen2moe, qwen3moe, olmoe, Mixtral as llama with experts): logits against transformers on the
HF checkpoint, stacked expert tensors kept as zero-copy per-expert block views, checked against gguf's own
dequantization, and the CLI on an MoE file."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize

import edgellm
from edgellm.errors import UnsupportedModelError
from edgellm.quant import qmatmul
from edgellm.quant.gguf import expert_name, hf_name
from edgellm.quant.gguf_read import load_gguf
from edgellm.quant.gguf_write import export_gguf
from edgellm.quant.linear import QuantizedLinear
from tests.conftest import CONFIGS, build_checkpoint
from tests.test_errors import run_cli
from tests.test_gguf import logits, reference_with, rewrite, roundtrip
from tests.test_kquants import random_blocks
from tests.test_moe import MOE_CONFIGS, hf_model

CASES = {"mixtral": ("mixtral", {}), "qwen2_moe": ("qwen2_moe", {}), "qwen3_moe": ("qwen3_moe", {}),
         "olmoe": ("olmoe", {}), "olmoe-clip": ("olmoe", {"clip_qkv": 0.5})}
ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def moe_checkpoint(tmp_path, monkeypatch):
    """Factory: moe_checkpoint(arch, **overrides) -> a tiny saved HF MoE model (4 experts, top-2)."""
    for name, entry in MOE_CONFIGS.items():
        monkeypatch.setitem(CONFIGS, name, entry)
    return lambda arch, **overrides: build_checkpoint(tmp_path / arch, arch, **overrides)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_f32_gguf_matches_transformers(moe_checkpoint, tmp_path, tokens, case):
    arch, overrides = CASES[case]
    path = moe_checkpoint(arch, **overrides)
    gguf_path = export_gguf(path, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(gguf_path)
    assert reader.get_field("general.architecture").contents() == ARCH[arch]
    model, tok = load_gguf(gguf_path, "fp32")
    assert model.args.model_type == arch and model.args.num_experts == 4
    down = {t.name: t for t in reader.tensors}["blk.1.ffn_down_exps.weight"]  # ggml order: (in, out, n_expert)
    assert down.shape.tolist() == [model.args.expert_size, 64, 4]
    reference = hf_model(path)
    with torch.no_grad():
        assert (logits(model, tokens) - reference(tokens).logits).abs().max().item() <= 1e-4
    prompt = tokens[:, :16]
    expected = reference.generate(prompt, max_new_tokens=8, do_sample=False)[0, 16:].tolist()
    assert edgellm.generate(model, tok, prompt[0].tolist(), 8).tokens == expected


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_transformers_gguf_loader_reads_the_export(moe_checkpoint, tmp_path, tokens, arch):
    """transformers' own GGUF reader, on the file edgellm wrote, gives the checkpoint's logits exactly (it ignores
    {arch}.expert_feed_forward_length, so the sizes come from config.json; it has no Mixtral or OLMoE reader)."""
    pytest.importorskip("accelerate")  # transformers requires it for GGUF
    path = moe_checkpoint(arch)
    export_gguf(path, tmp_path / "m.gguf", "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", config=transformers.AutoConfig.from_pretrained(path), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(theirs.eval()(tokens).logits, hf_model(path)(tokens).logits)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_q8_0_experts_are_block_views_of_the_file(moe_checkpoint, tmp_path, tokens, arch, monkeypatch):
    path = moe_checkpoint(arch)
    gguf_path = export_gguf(path, tmp_path / "m.gguf", "q8_0")
    stored = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    model, _ = load_gguf(gguf_path, "fp32")
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        for part, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            on_disk = stored[f"blk.{layer}.ffn_{part}_exps.weight"]
            assert on_disk.tensor_type == GT.Q8_0 and on_disk.data.shape[0] == 4
            first = getattr(experts[0], proj).blocks
            for e in range(4):
                linear = getattr(experts[e], proj)
                assert isinstance(linear, QuantizedLinear) and linear.fmt.name == "q8_0"
                assert np.array_equal(linear.blocks.numpy(), on_disk.data[e])
                # one mapped run of blocks per expert, back to back as in the file: nothing copied
                assert linear.blocks.data_ptr() == first.data_ptr() + e * first.nbytes
                want = dequantize(on_disk.data[e], GT.Q8_0).reshape(linear.out_features, linear.in_features)
                assert torch.equal(linear.quantized.dequantize(), torch.from_numpy(want))
    assert stored["blk.0.ffn_gate_inp.weight"].tensor_type == GT.F32  # routers stay F32, as llama.cpp's converter

    def replace(name: str, w: torch.Tensor) -> torch.Tensor:
        return w if w.dim() == 1 or name.endswith("mlp.gate.weight") else roundtrip(w, GT.Q8_0)

    want = logits(reference_with(path, replace), tokens)
    # The int8 GEMVs round activations: logits stay within 1% of their range except at a position where that
    # rounding flips a near-tied router choice (one of 40 for this Mixtral).
    close = (logits(model, tokens) - want).abs().amax(-1) <= 0.01 * want.abs().max()
    assert close.sum() >= tokens.shape[1] - 2
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    torch.testing.assert_close(logits(model, tokens), want, atol=1e-4, rtol=1e-4)


def test_k_quant_experts_from_package_writer(moe_checkpoint, tmp_path, tokens, monkeypatch):
    """Random valid Q4_K / Q6_K / Q5_K / Q2_K stacked experts (gguf cannot quantize k-quants) written by the gguf
    package stay the file's blocks, expert by expert, and give the logits of the model whose experts are gguf's
    dequantization of those blocks; a BF16 expert tensor loads as float weights."""
    path = moe_checkpoint("qwen2_moe", hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                          shared_expert_intermediate_size=256)
    base = export_gguf(path, tmp_path / "f32.gguf", "f32")
    stored = {t.name: t for t in gguf.GGUFReader(base).tensors}
    types = {"blk.0.ffn_gate_exps.weight": GT.Q4_K, "blk.0.ffn_up_exps.weight": GT.Q4_K,
             "blk.0.ffn_down_exps.weight": GT.Q6_K, "blk.1.ffn_gate_exps.weight": GT.Q5_K,
             "blk.1.ffn_down_exps.weight": GT.Q2_K}
    replace, expected = {}, {}
    for seed, (name, qtype) in enumerate(types.items()):
        n_expert, rows, k = stored[name].data.shape
        blocks = random_blocks(qtype.name.lower(), n_expert * rows, k, seed=seed, scale=1e-3)
        replace[name] = (blocks.reshape(n_expert, rows, -1), qtype)
        w = torch.from_numpy(dequantize(blocks, qtype)).reshape(n_expert, rows, k)
        for e in range(n_expert):
            expected[expert_name(hf_name(name), e)] = w[e]
    up = torch.from_numpy(stored["blk.1.ffn_up_exps.weight"].data.copy())
    replace["blk.1.ffn_up_exps.weight"] = (up.bfloat16().view(torch.uint8).numpy(), GT.BF16)
    for e in range(4):
        expected[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] = up[e].bfloat16().float()
    model, _ = load_gguf(rewrite(base, tmp_path / "k.gguf", replace=replace), "fp32")
    for name, (blocks, qtype) in replace.items():
        if qtype == GT.BF16:
            continue
        layer, part = int(name.split(".")[1]), name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")
        for e in range(4):
            linear = getattr(model.model.layers[layer].mlp.experts[e], f"{part}_proj")
            assert isinstance(linear, QuantizedLinear) and linear.fmt.name == qtype.name.lower()
            assert np.array_equal(linear.blocks.numpy(), blocks[e])
    assert isinstance(model.model.layers[1].mlp.experts[2].up_proj, torch.nn.Linear)
    # with quantized projections the float head runs as Q8_0 (quantize_lm_head), as llama.cpp would store it
    ref = logits(reference_with(path, lambda name, w: expected.get(
        name, roundtrip(w, GT.Q8_0) if name == "lm_head.weight" else w)), tokens)
    got = logits(model, tokens)  # 40 rows through the Q8_K GEMVs
    assert (got - ref).norm() <= 0.1 * ref.norm()
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, overrides, message", [
    ("qwen3_moe", {"norm_topk_prob": False}, "always renormalises"),
    ("qwen2_moe", {"norm_topk_prob": True}, "never renormalises"),
    ("qwen2_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]}, "dense layers"),
])
def test_export_refuses_what_llama_cpp_runs_differently(moe_checkpoint, tmp_path, arch, overrides, message):
    path = moe_checkpoint(arch, **overrides)
    with pytest.raises(UnsupportedModelError, match=message):
        export_gguf(path, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.glob("m.gguf*"))


def test_cli_generates_from_an_moe_gguf(moe_checkpoint, tmp_path):
    path = moe_checkpoint("qwen3_moe")
    gguf_path = export_gguf(path, tmp_path / "m.gguf", "q8_0")
    result = run_cli("generate", "--model", str(gguf_path), "--prompt", "def f(x):", "--max-tokens", "6",
                     "--threads", "1", "--json", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    model, tok = edgellm.load(gguf_path, "fp32")
    assert out["tokens"] == edgellm.generate(model, tok, "def f(x):", 6).tokens
    assert "decode_tok_s" in out  # the CLI reports its timings (their values belong to benchmarks)

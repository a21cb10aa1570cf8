"""gpt-oss's MXFP4 release layout (`experts.*_proj_blocks` / `_scales`, quant_method mxfp4): the file decodes in
transformers to the intended weights, edgellm keeps the experts as mxfp4 blocks and matches transformers' model on
the dequantized experts; malformed files give one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import edgellm.quant.qmatmul as qmatmul
from edgellm import generate, load
from edgellm.errors import CheckpointError, InvalidRequestError
from edgellm.info import model_info
from edgellm.models import offload
from edgellm.quant.formats import quantize
from edgellm.quant.linear import QuantizedLinear
from tests.conftest import CONFIGS, build_checkpoint
from tests.test_errors import assert_one_line_error, run_cli
from tests.test_gpt_oss import GPT_OSS

PROJECTIONS = ("gate_up_proj", "down_proj")


def to_release(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An expert's Linear weight (out, in) as the release stores it — codes (out, in/32, 16) with elements 2j/2j+1
    in byte j's low/high nibble, E8M0 scales (out, in/32) — via edgellm's mxfp4 quantizer (transformers quantizes
    only with its Triton kernels); also the weight those blocks stand for."""
    qt = quantize(weight, "mxfp4")
    blocks = qt.data["blocks"].view(weight.shape[0], -1, 17)
    codes = torch.cat([blocks[..., 1:] & 0x0F, blocks[..., 1:] >> 4], -1)  # ggml: elements j, j + 16 in byte j
    return codes[..., 0::2] | (codes[..., 1::2] << 4), blocks[..., 0].contiguous(), qt.dequantize()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny gpt-oss (4 layers, 4 experts top-2, hidden 64, expert width 32) in the MXFP4 release layout, biases
    and sinks redrawn so they matter, and the expert weights its blocks decode to: {name: (E, in, out)}."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CONFIGS, "gpt_oss", GPT_OSS)
        path = build_checkpoint(tmp_path_factory.mktemp("gpt_oss_mxfp4"), "gpt_oss")
    g = torch.Generator().manual_seed(7)
    weights, out, decoded = load_file(path / "model.safetensors"), {}, {}
    for name, tensor in weights.items():
        if name.endswith(PROJECTIONS):  # (E, in, out): each expert's Linear weight transposed
            parts = [to_release(w.t().contiguous()) for w in tensor.unbind(0)]
            out[f"{name}_blocks"], out[f"{name}_scales"] = (torch.stack([p[i] for p in parts]) for i in (0, 1))
            decoded[name] = torch.stack([p[2].t() for p in parts])
        elif name.endswith(("bias", "sinks")):
            out[name] = torch.randn(tensor.shape, generator=g) * (1.0 if name.endswith("sinks") else 0.3)
        else:
            out[name] = tensor
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return path, decoded


def reference(path) -> transformers.PreTrainedModel:
    """transformers' own load of the release: on a CPU it dequantizes the experts (convert_moe_packed_tensors)."""
    config = transformers.Mxfp4Config(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             quantization_config=config).eval()


def test_file_decodes_in_transformers_to_the_intended_weights(release):
    path, decoded = release
    weights = load_file(path / "model.safetensors")
    for name, want in decoded.items():
        assert weights[f"{name}_blocks"].dtype == torch.uint8
        got = convert_moe_packed_tensors(weights[f"{name}_blocks"], weights[f"{name}_scales"], dtype=torch.float32)
        assert torch.equal(got, want)
    hf = reference(path)
    assert torch.equal(hf.model.layers[1].mlp.experts.down_proj, decoded["model.layers.1.mlp.experts.down_proj"])
    info = model_info(path)  # counts two weights per block byte
    assert info["parameters"] == sum(p.numel() for p in hf.parameters()) and info["quantization"].startswith("mxfp4")


def test_logits_and_greedy_tokens_match_transformers(release, monkeypatch):
    """Dequantizing the blocks (the prefill kernel) gives transformers' logits; the decode kernels, which round
    activations to int8 per 32 (as llama.cpp's), stay close and pick the same greedy tokens."""
    path, _ = release
    model, tokenizer = load(path, "fp32")
    hf = reference(path)
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model(ids) - ref).abs().max().item() <= 1e-2
        monkeypatch.setattr(qmatmul, "kernel_for", lambda *args: "dequant")
        assert (model(ids) - ref).abs().max().item() <= 1e-5
    monkeypatch.undo()
    prompt = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    want = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 24:].tolist()
    assert generate(model, tokenizer, prompt[0].tolist(), 12).tokens == want


def test_experts_stay_mxfp4_blocks(release):
    """17 bytes per 32 weights per expert (bf16: 64), exactly the file's blocks + scales; the rest as stored."""
    path, decoded = release
    model, _ = load(path, "fp32")
    layer = model.model.layers[2]
    for i, expert in enumerate(layer.mlp.experts):
        for proj in PROJECTIONS:
            linear = getattr(expert, proj)
            assert isinstance(linear, QuantizedLinear) and linear.fmt.name == "mxfp4"
            assert linear.bias.dtype == torch.float32 and not hasattr(linear, "weight")
            assert linear.blocks.dtype == torch.uint8
            assert linear.blocks.numel() == linear.out_features * linear.in_features * 17 // 32
            assert torch.equal(linear.quantized.dequantize(), decoded[f"model.layers.2.mlp.experts.{proj}"][i].t())
    assert not isinstance(layer.self_attn.q_proj, QuantizedLinear) and not isinstance(model.lm_head, QuantizedLinear)
    with pytest.raises(InvalidRequestError, match="repacked in memory"):
        offload.enable(model, "50%")


def test_cli_generate(release):
    path, _ = release
    result = run_cli("generate", "--model", str(path), "--prompt", "def f(x):", "--max-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    assert 1 <= len(json.loads(result.stdout)["tokens"]) <= 8


def _broken(path, tmp_path, edit):
    out = tmp_path / "broken"
    shutil.copytree(path, out)
    weights = load_file(out / "model.safetensors")
    edit(weights)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("model.layers.1.mlp.experts.down_proj_scales"), "down_proj_scales is missing"),
    (lambda w: w.pop("model.layers.0.mlp.experts.gate_up_proj_blocks"), "gate_up_proj_blocks is missing"),
    (lambda w: w.update({"model.layers.0.mlp.experts.gate_up_proj_blocks":
                         w["model.layers.0.mlp.experts.gate_up_proj_blocks"][:, :, :1].contiguous()}),
     "config.json implies"),
    (lambda w: w.update({"model.layers.3.mlp.experts.down_proj_scales":
                         w["model.layers.3.mlp.experts.down_proj_scales"].float()}), "torch.float32"),
])
def test_malformed_checkpoint_is_refused(release, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load(_broken(release[0], tmp_path, edit), "fp32")


def test_malformed_checkpoint_cli_error_is_one_line(release, tmp_path):
    broken = _broken(release[0], tmp_path, lambda w: w.pop("model.layers.2.mlp.experts.gate_up_proj_scales"))
    result = run_cli("generate", "--model", str(broken), "--prompt", "hi", "--max-tokens", "2")
    assert_one_line_error(result, "gate_up_proj_scales is missing")

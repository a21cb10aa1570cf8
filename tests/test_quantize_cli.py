"""`edgellm quantize`: checkpoints that load and run everywhere, and clear refusals that leave OUT_DIR untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edgellm import load
from edgellm.cli import main
from edgellm.errors import CheckpointError
from edgellm.quant import qmatmul, quantize
from edgellm.quant.convert import quantize_checkpoint
from edgellm.quant.formats import WeightFormat
from edgellm.quant.linear import QuantizedLinear
from tests.conftest import build_checkpoint
from tests.test_errors import assert_one_line_error, run_cli

# Logit error |l - ref| / |ref| vs the fp32 model (measured 0.009, 0.15, 0.21, 0.13, 0.35, 0.73, 0.86 on `src`):
# Gaussian random weights are the worst case for 2-bit formats, so the exact check is against dequantized weights.
TOLERANCE = {"q8_0": 0.02, "q4_0": 0.25, "mxfp4": 0.35, "int4-g64": 0.25, "int3-g128": 0.5, "int2-g64": 0.9,
             "ternary": 0.95}
TOKENS = torch.tensor([[0, 17, 93, 5, 250, 41, 8, 120]])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A Qwen2 model (q/k/v bias) whose every projection input size is a multiple of 128."""
    return build_checkpoint(tmp_path_factory.mktemp("qsrc"), "qwen2", hidden_size=128, intermediate_size=256)


def dequantized_reference(src: Path, fmt: str) -> torch.nn.Module:
    """The fp32 model with each projection weight replaced by its quantize→dequantize round trip, and the output
    head by its round trip through the format the loader runs it in (Q8_0, Q4_0 beside 2-bit projections; the
    embedding table untouched, even when tied to the head)."""
    model, _ = load(src, "fp32")
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1].endswith("_proj"):
            module.weight.data = quantize(module.weight, fmt).dequantize()
    head = quantize(model.lm_head.weight.detach(), WeightFormat.parse(fmt).head)
    model.lm_head.weight = torch.nn.Parameter(head.dequantize())
    return model


@pytest.mark.parametrize("fmt", list(TOLERANCE))
def test_quantized_checkpoint_loads_and_matches(src, tmp_path, fmt, monkeypatch):
    out = tmp_path / fmt
    report = quantize_checkpoint(src, out, fmt, dtype="fp32")
    assert report.quantized_tensors == 2 * 7 and report.output_bytes < report.input_bytes
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "edgellm" and config["quantization_config"]["format"] == fmt
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["edgellm_quant_format"] == fmt
        assert "model.layers.1.self_attn.q_proj.bias" in f.keys()
        assert "model.layers.1.mlp.down_proj.weight" not in f.keys()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()

    model, _ = load(out, "fp32")
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.fingerprint
    head = "q4_0" if fmt in ("int2-g64", "ternary") else "q8_0"
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.fmt.name == head
    assert torch.equal(model.model.embed_tokens.weight, load(src, "fp32")[0].model.embed_tokens.weight)
    logits = model(TOKENS)
    ref = load(src, "fp32")[0](TOKENS)
    dequantized = dequantized_reference(src, fmt)(TOKENS)
    assert (logits - ref).norm() <= TOLERANCE[fmt] * ref.norm()
    # the decode kernels round activations (VNNI) or lookup tables (LUT) to int8; dequant + GEMM is exact
    assert (logits - dequantized).abs().max() <= 0.02 * dequantized.abs().max()
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    assert torch.allclose(model(TOKENS), dequantized, rtol=1e-4, atol=1e-4)


def test_bf16_load_runs_unfused_and_matches_fp32(src, tmp_path):
    out = tmp_path / "q4"
    quantize_checkpoint(src, out, "q4_0")  # default: unquantized tensors stored in bf16
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.self_attn.q_proj.blocks").dtype == torch.uint8
    model16, _ = load(out, "bf16")
    model32, _ = load(out, "fp32")
    assert model16.model.layers[0].self_attn.qkv is None
    a, b = model16(TOKENS).float(), model32(TOKENS)
    assert (a - b).norm() < 0.05 * b.norm()


def test_cli_quantize_then_generate_and_info(src, tmp_path, capsys):
    out = tmp_path / "int4"
    result = run_cli("quantize", str(src), str(out), "--format", "int4-g64", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert "int4-g64" in result.stdout
    gen = run_cli("generate", "--model", str(out), "--prompt", "def f(x):", "--max-tokens", "4", "--json")
    assert gen.returncode == 0, gen.stderr
    assert 1 <= len(json.loads(gen.stdout)["tokens"]) <= 4
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["info", str(src), "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert info["quantization"] == "int4-g64 (4.5 bits/weight)" and info["parameters"] == ref["parameters"]


def refused(capsys, *args: str) -> str:
    """Run the CLI in-process (subprocess start-up costs ~5 s here); expect exit code 2 and a one-line error."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgellm: error:"), err
    return lines[0]


def test_cli_refuses_bad_input_and_leaves_out_dir_untouched(src, checkpoint, tmp_path, capsys):
    odd = checkpoint("llama", hidden_size=48, intermediate_size=96)
    capsys.readouterr()  # transformers' save progress bar
    tmp_path = tmp_path / "work"
    out = tmp_path / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli("quantize", str(src), str(out), "--format", "q4_0"), "not empty", "--force")
    assert "unknown weight format 'q5_k'" in refused(capsys, "quantize", str(src), str(tmp_path / "new"),
                                                     "--format", "q5_k")
    assert "multiple of 32" in refused(capsys, "quantize", str(odd), str(tmp_path / "new"), "--format", "q4_0")
    assert "does not exist" in refused(capsys, "quantize", str(tmp_path / "no"), str(tmp_path / "new"),
                                       "--format", "q8_0")
    assert "is the input directory" in refused(capsys, "quantize", str(src), str(src), "--format", "q8_0", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir or partial output left behind

    done = tmp_path / "done"
    quantize_checkpoint(src, done, "q8_0")
    assert "already quantized" in refused(capsys, "quantize", str(done), str(tmp_path / "again"), "--format", "q4_0")
    assert main(["quantize", str(src), str(out), "--format", "ternary", "--force"]) == 0
    assert not (out / "keep.txt").exists() and load(out)[0] is not None


def test_affine_formats_pad_inputs_that_are_not_whole_groups(checkpoint, tmp_path):
    odd = checkpoint("llama", hidden_size=48, intermediate_size=96)
    quantize_checkpoint(odd, tmp_path / "t", "int4-g64", dtype="fp32")
    ref, _ = load(odd, "fp32")
    logits, expected = load(tmp_path / "t", "fp32")[0](TOKENS), ref(TOKENS)
    assert (logits - expected).norm() <= TOLERANCE["int4-g64"] * expected.norm()


def test_loader_rejects_mismatched_quantized_checkpoints(src, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(src, out, "q4_0")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format"] = "q8_0"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"\.blocks has shape \(128, 144\) but config.json implies"):
        load(out)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'gptq' is not supported"):
        load(out)

"""gpt-oss GGUF (llama.cpp's `gpt-oss` architecture): export and import against the safetensors model (f32, f16,
q8_0, MXFP4 experts carried from `edgellm quantize`), gate/up split into llama.cpp's separate stacked tensors and
kept as per-expert views of the file, llama.cpp's own greedy tokens on the export, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from safetensors.torch import load_file, save_file

import edgellm
from edgellm.errors import UnsupportedModelError
from edgellm.loader import load_model
from edgellm.models import offload
from edgellm.quant import qmatmul
from edgellm.quant.convert import quantize_checkpoint
from edgellm.quant.gguf import gguf_name, hf_name
from edgellm.quant.gguf_read import load_gguf
from edgellm.quant.gguf_write import export_gguf
from edgellm.quant.linear import QuantizedLinear
from tests.conftest import CONFIGS, build_checkpoint
from tests.test_gguf import logits, reference_with, roundtrip
from tests.test_gpt_oss import GPT_OSS

# llama.cpp always rounds YaRN's correction range outward (transformers' truncate=True); gpt-oss's own config says
# false, which llama.cpp runs slightly differently (test_yarn_truncate_and_refusals). Scales make attention, the
# router and the SwiGLU clamp matter, so a wrong sink, bias or gate/up order moves the logits far.
ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
        "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
SCALES = {"q_proj": 8, "k_proj": 8, "gate_up_proj": 40, "router.weight": 20, "embed_tokens": 20, "lm_head": 5}
PROMPT = "def fibonacci(n):"


def build(out: Path, **overrides) -> Path:
    """A tiny gpt-oss (4 layers sliding/full, 4 experts top-2) with random biases and sinks and scaled weights."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CONFIGS, "gpt_oss", GPT_OSS)
        path = build_checkpoint(out, "gpt_oss", **{"rope_parameters": ROPE, **overrides})
    weights = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    for name, w in weights.items():
        if name.endswith(("bias", "sinks")):
            weights[name] = torch.randn(w.shape, generator=g) * (1.0 if name.endswith("sinks") else 0.3)
        else:
            weights[name] = w * next((s for k, s in SCALES.items() if k in name), 1)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("gpt_oss"))


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))


def test_names_round_trip():
    for ours, theirs in (("model.layers.3.self_attn.sinks", "blk.3.attn_sinks.weight"),
                         ("model.layers.0.post_attention_layernorm.weight", "blk.0.post_attention_norm.weight"),
                         ("model.layers.0.mlp.router.bias", "blk.0.ffn_gate_inp.bias"),
                         ("model.layers.1.mlp.experts.up_proj.bias", "blk.1.ffn_up_exps.bias")):
        assert gguf_name(ours, "gpt-oss") == theirs and hf_name(theirs, "gpt-oss") == ours
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"  # other archs


def test_f32_and_f16_gguf_match_the_safetensors_model(gpt_oss, tmp_path, tokens):
    exact = logits(load_model(gpt_oss, "fp32"), tokens)
    model, tok = load_gguf(export_gguf(gpt_oss, tmp_path / "f32.gguf", "f32"), "fp32")
    assert (logits(model, tokens) - exact).abs().max() <= 1e-5 * exact.abs().max()
    reference, ref_tok = edgellm.load(gpt_oss, "fp32")
    assert edgellm.generate(model, tok, PROMPT, 12).tokens == edgellm.generate(reference, ref_tok, PROMPT, 12).tokens

    path = export_gguf(gpt_oss, tmp_path / "f16.gguf", "f16")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert gguf.GGUFReader(path).get_field("general.architecture").contents() == "gpt-oss"
    # ggml order (in, out, n_expert); biases (out, n_expert); router and sinks F32
    assert stored["blk.1.ffn_gate_exps.weight"].shape.tolist() == [64, 32, 4]
    assert stored["blk.1.ffn_up_exps.bias"].shape.tolist() == [32, 4]
    assert stored["blk.1.ffn_down_exps.weight"].shape.tolist() == [32, 64, 4]
    assert stored["blk.1.ffn_gate_exps.weight"].tensor_type == GT.F16
    assert {stored[n].tensor_type for n in ("blk.0.ffn_gate_inp.weight", "blk.0.attn_sinks.weight")} == {GT.F32}
    gate_up = load_file(gpt_oss / "model.safetensors")["model.layers.1.mlp.experts.gate_up_proj_bias"]  # (E, 2I)
    for part, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):  # HF interleaves gate, up, ...
        assert torch.equal(torch.from_numpy(stored[f"blk.1.ffn_{part}_exps.bias"].data.copy()), gate_up[:, rows])
    model, _ = load_gguf(path, "fp32")
    ref = reference_with(gpt_oss, lambda name, w: w.half().float() if w.dim() == 2 and "router" not in name else w)
    want = logits(ref, tokens)
    assert (logits(model, tokens) - want).abs().max() <= 1e-4 * want.abs().max()
    assert (logits(model, tokens) - exact).abs().max() > 1e-4 * exact.abs().max()  # f16 rounding is visible


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])
def test_quantized_experts_are_block_views_of_the_file(gpt_oss, tmp_path, tokens, monkeypatch, ftype):
    """Gate and up stay two projections over the file's stacked blocks (no interleaving copy, so expert offload
    works); with exact kernels the logits are the reference's with every 2-D weight but the router through the
    file's type (the head in Q8_0 for q4_0, as target_type writes it)."""
    qtype = GT[ftype.upper()]
    path = export_gguf(gpt_oss, tmp_path / "q.gguf", ftype)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    model, tok = load_gguf(path, "fp32")
    experts = model.model.layers[2].mlp.experts
    for part in ("gate", "up", "down"):
        on_disk = stored[f"blk.2.ffn_{part}_exps.weight"]
        assert on_disk.tensor_type == qtype
        first = getattr(experts[0], f"{part}_proj")
        for e in range(4):
            linear = getattr(experts[e], f"{part}_proj")
            assert isinstance(linear, QuantizedLinear) and linear.bias is not None
            assert np.array_equal(linear.blocks.numpy(), on_disk.data[e])
            assert linear.blocks.data_ptr() == first.blocks.data_ptr() + e * first.blocks.nbytes
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    expected = edgellm.generate(model, tok, PROMPT, 8).tokens
    offload.enable(model, "75%")  # refused unless the experts are still mapped from the file
    assert edgellm.generate(model, tok, PROMPT, 8).tokens == expected
    want = logits(reference_with(gpt_oss, lambda name, w: w if w.dim() == 1 or "router" in name else roundtrip(
        w, GT.Q8_0 if name == "lm_head.weight" else qtype)), tokens)
    torch.testing.assert_close(logits(model, tokens), want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_mxfp4_experts_carried_from_edgellm_quantize(gpt_oss, tmp_path, tokens, monkeypatch):
    """An `edgellm quantize` MXFP4 checkpoint exports its expert blocks as they are (GGML type MXFP4, gate/up rows
    de-interleaved): each loaded expert computes what the checkpoint's interleaved one does."""
    quantize_checkpoint(gpt_oss, tmp_path / "mx", "mxfp4", dtype="fp32")
    path = export_gguf(tmp_path / "mx", tmp_path / "mx.gguf", "f16")
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors if "_exps.weight" in t.name} == {GT.MXFP4}
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    model, _ = load_gguf(path, "fp32")
    source = load_model(tmp_path / "mx", "fp32")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in (0, 3):
            for e in range(4):
                ours, theirs = model.model.layers[layer].mlp.experts[e], source.model.layers[layer].mlp.experts[e]
                assert ours.up_proj.fmt.name == "mxfp4" and theirs.gate_up_proj.fmt.name == "mxfp4"
                torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    want = logits(source, tokens)  # the GGUF's float head runs as Q8_0 beside quantized projections
    assert (logits(model, tokens) - want).abs().max() <= 0.01 * want.abs().max()


def test_llama_cpp_decodes_the_export_as_edgellm(gpt_oss, tmp_path):
    """llama.cpp's gpt-oss graph on the F32 export: the same greedy tokens and logits (F16 weights would make both
    engines round differently: llama.cpp's F16 matmuls round the activations too)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(gpt_oss, tmp_path / "f32.gguf", "f32")
    model, tok = edgellm.load(path, "fp32")
    expected = edgellm.generate(model, tok, PROMPT, 16).tokens
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, logits_all=True)
    except ValueError as e:  # llama-cpp-python raises ValueError when llama.cpp refuses the file
        pytest.skip(f"llama.cpp cannot load the tiny gpt-oss GGUF: {e}")
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)
    assert ids == tok.encode(PROMPT)
    got = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(expected):
            break
    assert got == expected
    seq = ids + got
    llm.reset()
    llm.eval(seq)
    theirs = torch.tensor(np.array(llm.scores[:len(seq)]))
    ours = logits(model, torch.tensor([seq]))[0]
    assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max()  # llama.cpp keeps its KV cache in f16


def test_yarn_truncate_and_refusals(tmp_path, tokens):
    """gpt-oss's own truncate=false exports as llama.cpp runs it (rounded correction range, a small logit drift);
    layer windows, SwiGLU constants and YaRN factors llama.cpp's gpt-oss graph fixes otherwise are refused in one
    line, before any file is written."""
    path = build(tmp_path / "loose", rope_parameters={**ROPE, "truncate": False})
    model, _ = load_gguf(export_gguf(path, tmp_path / "m.gguf", "f32"), "fp32")
    assert model.args.rope_scaling["truncate"] is True
    exact = logits(load_model(path, "fp32"), tokens)
    assert 1e-5 < (logits(model, tokens) - exact).abs().max() <= 0.01 * exact.abs().max()
    for overrides, message in (
            ({"layer_types": ["full_attention", "sliding_attention"] * 2}, "even layers only"),
            ({"swiglu_limit": 5.0}, "swiglu alpha 1.702 and limit 7.0"),
            ({"rope_parameters": {**ROPE, "attention_factor": 2.0}}, "attention_factor cannot be exported")):
        bad = build(tmp_path / message.split()[0], **overrides)
        with pytest.raises(UnsupportedModelError, match=message) as err:
            export_gguf(bad, tmp_path / "bad.gguf", "f16")
        assert "\n" not in str(err.value)
        assert not list(tmp_path.glob("bad.gguf*"))


def with_fields(src: Path, dst: Path, changes: dict) -> Path:
    """A copy of a GGUF file with metadata keys replaced (or added, as float32) by a value or, for None, left out."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.get_field("general.architecture").contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or (key in changes and changes[key] is None):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, changes.get(key, f.contents()), f.types[0], sub)
    for key, value in changes.items():
        if key not in reader.fields and value is not None:
            writer.add_key_value(key, value, gguf.GGUFValueType.FLOAT32)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("changes, error, message", [
    ({"gpt-oss.attention.sliding_window": None}, "GGUFError", "gpt-oss.attention.sliding_window is missing"),
    ({"gpt-oss.expert_used_count": None}, "GGUFError", "gpt-oss.expert_used_count is missing"),
    ({"gpt-oss.rope.scaling.yarn_attn_factor": 2.0}, "UnsupportedModelError", "yarn_attn_factor = 2.0 is not"),
])
def test_incomplete_or_unsupported_files_fail_in_one_line(gpt_oss, tmp_path, changes, error, message):
    path = export_gguf(gpt_oss, tmp_path / "m.gguf", "q8_0")
    with pytest.raises(Exception, match=message) as err:
        load_gguf(with_fields(path, tmp_path / "bad.gguf", changes), "fp32")
    assert type(err.value).__name__ == error and "\n" not in str(err.value)

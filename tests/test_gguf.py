"""GGUF import/export: logits against the safetensors model, blocks against gguf's reference quantizers,
the embedded tokenizer against the original, and one-line typed errors for files edgellm cannot load."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize
from gguf.quants import quantize as ref_quantize
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

import edgellm
from edgellm.cli import main
from edgellm.errors import UnsupportedModelError
from edgellm.kernels.ggml_blocks import quantize_activations, quantize_activations_q8k
from edgellm.kernels.select import choose_kernel
from edgellm.loader import load_model, read_weights
from edgellm.quant import qmatmul
from edgellm.quant.convert import quantize_checkpoint
from edgellm.quant.formats import QuantizedTensor
from edgellm.quant.gguf import LLAMA3_REGEX, GGUFError, gguf_name, hf_name, permute_qk, qk_heads, unpermute_qk
from edgellm.quant.gguf_file import open_gguf
from edgellm.quant.gguf_read import gguf_tokenizer, load_gguf
from edgellm.quant.gguf_write import add_tokenizer, export_gguf
from edgellm.quant.linear import QuantizedEmbedding, QuantizedLinear
from edgellm.tokenizer import Tokenizer
from tests.conftest import SAMPLE_TEXT
from tests.test_kquants import random_blocks

TEXTS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n", "Ünïcödé: 東京, emoji 🙂 and ñ.",
         "  leading and   inner spaces\n\n\ttabs", "numbers 1234567 and 3.14159", "<|user|>hi<|end|><|assistant|>",
         "it's we'll they're I'd", ""]
HEADS, KV_HEADS = 4, 2


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def tokens() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 384, (1, 24))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def reference_with(path: Path, replace) -> torch.nn.Module:
    """The safetensors model in fp32 with each weight passed through `replace(hf_name, weight)`."""
    model = load_model(path, "fp32")
    for name, p in model.named_parameters():
        p.data = replace(name, p.data.clone())
    return model


def roundtrip(w: torch.Tensor, qtype: GT) -> torch.Tensor:
    """The weight after gguf's reference quantizer and dequantizer (llama.cpp's rounding)."""
    return torch.from_numpy(dequantize(ref_quantize(w.numpy(), qtype), qtype)).reshape(w.shape)


def rewrite(src: Path, dst: Path, arch: str | None = None, replace: dict | None = None) -> Path:
    """Copy a GGUF file with the gguf package's own writer, changing the architecture or some tensors
    (name → (uint8 blocks or float array, GGML type))."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(dst, arch or old_arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.replace(f"{old_arch}.", f"{arch}.") if arch else key, f.contents(), f.types[0], sub)
    for t in reader.tensors:
        data, qtype = (replace or {}).get(t.name, (t.data, t.tensor_type))
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f16_gguf_matches_safetensors_model(checkpoint, tmp_path, tokens, arch):
    path = checkpoint(arch)
    gguf_path = export_gguf(path, tmp_path / "m.gguf", "f16")
    assert gguf.GGUFReader(gguf_path).get_field("general.architecture").contents() == arch
    model, _ = load_gguf(gguf_path, "fp32")
    ref = reference_with(path, lambda name, w: w.half().float() if w.dim() == 2 else w)
    torch.testing.assert_close(logits(model, tokens), logits(ref, tokens), atol=2e-5, rtol=1e-5)
    exact = logits(load_model(path, "fp32"), tokens)
    assert (logits(model, tokens) - exact).abs().max() < 5e-3 * exact.abs().max()


@pytest.fixture
def exact_kernels(monkeypatch):
    """Quantized matmuls by dequant + GEMM (the int8 decode kernels round), so equal weights give equal logits."""
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])
def test_quantized_gguf_matches_reference_dequantized_weights(checkpoint, tmp_path, tokens, ftype, monkeypatch):
    path = checkpoint("llama")
    model, _ = load_gguf(export_gguf(path, tmp_path / "m.gguf", ftype), "fp32")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantizedLinear) and isinstance(layer.mlp.down_proj, QuantizedLinear)
    assert layer.self_attn.q_proj.fmt.name == ftype
    main_type = GT.Q8_0 if ftype == "q8_0" else GT.Q4_0

    def replace(name: str, w: torch.Tensor) -> torch.Tensor:
        if w.dim() == 1:
            return w
        return roundtrip(w, GT.Q8_0 if name == "lm_head.weight" else main_type)  # q4_0 keeps output in Q8_0

    got, want = logits(model, tokens), logits(reference_with(path, replace), tokens)
    # decode kernels (VNNI / LUT) round activations or tables to int8; dequant + GEMM must match exactly
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    torch.testing.assert_close(logits(model, tokens), want, atol=1e-4, rtol=1e-4)
    exact = logits(load_model(path, "fp32"), tokens)
    assert (got - exact).norm() < (0.02 if ftype == "q8_0" else 0.2) * exact.norm()


def test_q4_0_lookup_table_copy_waits_for_a_call_that_uses_it(checkpoint, tmp_path):
    """A Q4_0 model prefilled in long chunks (dequant + GEMM) and decoded by the fused step reads its blocks as
    stored and never holds the table-lookup copy (as large again as the weights); the first op-at-a-time call with
    few rows makes it, and then computes what the int8 kernel computed within the two kernels' rounding."""
    model, tok = load_gguf(export_gguf(checkpoint("llama"), tmp_path / "m.gguf", "q4_0"), "fp32")
    projections = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.fmt.name == "q4_0"]
    rows = next(m for m in range(1, 1024) if choose_kernel(4, 64, 64, m) != "lut")
    edgellm.generate(model, tok, list(range(2, 2 + rows)), 6)  # one prefill chunk past the LUT's rows, then fused
    assert projections and all(m.lut is None for m in projections)
    x = torch.randn(1, projections[0].in_features, generator=torch.Generator().manual_seed(0))
    q = projections[0]
    vnni = qmatmul.quantized_linear(x, q.weight_view, q.bias, None)
    with torch.no_grad():
        lut = q(x)
    assert q.lut is not None and not q.lut_due
    assert (lut - vnni).abs().max() <= 0.02 * vnni.abs().max()


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])
def test_export_import_keeps_blocks_bit_exact(checkpoint, tmp_path, ftype):
    path = checkpoint("llama")
    weights = read_weights(path)
    qtype = GT.Q8_0 if ftype == "q8_0" else GT.Q4_0
    gguf_path = export_gguf(path, tmp_path / "m.gguf", ftype)
    stored = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    model, _ = load_gguf(gguf_path, "fp32")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        w = weights[name].float()
        n = qk_heads(name, HEADS, KV_HEADS)
        on_disk = stored[gguf_name(name)]
        assert on_disk.tensor_type == qtype
        # llama.cpp's Q/K rows are interleaved per rotary pair; the blocks are gguf's reference quantizer's
        expected = ref_quantize((permute_qk(w, n) if n else w).numpy(), qtype)
        np.testing.assert_array_equal(on_disk.data, expected)
        loaded = model.get_submodule(name.removesuffix(".weight")).blocks
        np.testing.assert_array_equal(loaded.numpy(), ref_quantize(w.numpy(), qtype))
    assert stored["blk.0.attn_norm.weight"].tensor_type == GT.F32


def test_quantized_checkpoint_exports_its_blocks_unchanged(checkpoint, tmp_path, tokens, exact_kernels):
    path = checkpoint("llama")
    qdir = tmp_path / "q4"
    quantize_checkpoint(path, qdir, "q4_0", dtype="fp32")
    gguf_path = export_gguf(qdir, tmp_path / "q4.gguf", "f16")
    blocks = read_weights(qdir)
    stored = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    on_disk = stored["blk.1.attn_q.weight"]
    assert on_disk.tensor_type == GT.Q4_0
    np.testing.assert_array_equal(unpermute_qk(torch.from_numpy(on_disk.data.copy()), HEADS).numpy(),
                                  blocks["model.layers.1.self_attn.q_proj.blocks"].numpy())
    assert gguf.GGUFReader(gguf_path).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    model, _ = load_gguf(gguf_path, "fp32")
    assert torch.equal(model.model.layers[1].self_attn.q_proj.blocks, blocks["model.layers.1.self_attn.q_proj.blocks"])
    # The same blocks, so the same function: the GGUF model reproduces the quantized checkpoint's logits up to
    # the f16 rounding of the embedding and lm_head (which can move a Q8_0 head weight by one level).
    torch.testing.assert_close(logits(model, tokens), logits(load_model(qdir, "fp32"), tokens), atol=5e-3, rtol=1e-3)


def test_rows_that_are_not_whole_blocks_stay_f16(checkpoint, tmp_path, tokens, exact_kernels):
    path = checkpoint("llama", hidden_size=80)  # K = 80 is not a multiple of 32; down_proj's K = 128 is
    gguf_path = export_gguf(path, tmp_path / "m.gguf", "q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_path).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == types["output.weight"] == GT.F16
    assert types["blk.0.ffn_down.weight"] == GT.Q4_0
    model, _ = load_gguf(gguf_path, "fp32")
    ref = reference_with(path, lambda name, w: roundtrip(w, GT.Q4_0) if name.endswith("down_proj.weight")
                         else w.half().float() if w.dim() == 2 else w)
    torch.testing.assert_close(logits(model, tokens), logits(ref, tokens), atol=1e-4, rtol=1e-4)


def test_affine_quantized_checkpoint_exports_dequantized(checkpoint, tmp_path, tokens, exact_kernels):
    path = checkpoint("llama")
    quantize_checkpoint(path, tmp_path / "int4", "int4-g32", dtype="fp32")
    gguf_path = export_gguf(tmp_path / "int4", tmp_path / "int4.gguf", "f32")
    assert gguf.GGUFReader(gguf_path).get_field("general.file_type").contents() == gguf.LlamaFileType.ALL_F32
    model, _ = load_gguf(gguf_path, "fp32")
    quantized = load_model(tmp_path / "int4", "fp32")
    model.lm_head = quantized.lm_head  # the int4 model runs its head as Q8_0; the all-F32 GGUF keeps it float
    torch.testing.assert_close(logits(model, tokens), logits(quantized, tokens), atol=1e-5, rtol=1e-5)


def test_gguf_from_package_writer_with_k_quants_and_bf16(checkpoint, tmp_path, tokens, monkeypatch):
    """Q4_K_M-style projections (Q4_K, with Q6_K for attn_v and ffn_down) in layer 0, Q5_K/Q3_K/Q2_K in layer 1 and a
    Q6_K output head, as random valid blocks (gguf cannot quantize k-quants), stay quantized as the file's bytes; their
    logits match the model with gguf's dequantization of the same blocks (exactly through dequant + GEMM, within the
    Q8_K activation rounding through the decode GEMV)."""
    path = checkpoint("llama", hidden_size=256, intermediate_size=512)  # k-quant rows are 256-blocks
    base = export_gguf(path, tmp_path / "f32.gguf", "f32")
    types = {0: {"attn_v": GT.Q6_K, "ffn_down": GT.Q6_K}, 1: {"attn_q": GT.Q3_K, "attn_v": GT.Q2_K}}
    stored = {t.name: t for t in gguf.GGUFReader(base).tensors}
    replace, expected = {}, {}
    for seed, name in enumerate(n for n in stored if n.startswith("blk.") and n.endswith("weight")
                                and stored[n].data.ndim == 2):
        layer, part = int(name.split(".")[1]), name.split(".")[2]
        qtype = types[layer].get(part, GT.Q4_K if layer == 0 else GT.Q5_K)
        rows, k = stored[name].data.shape
        blocks = random_blocks(qtype.name.lower(), rows, k, seed=seed, scale=1e-3)
        replace[name] = (blocks, qtype)
        hf = hf_name(name)
        w = torch.from_numpy(dequantize(blocks, qtype)).reshape(rows, k)
        n = qk_heads(hf, HEADS, KV_HEADS)
        expected[hf] = unpermute_qk(w, n) if n else w
    w_up = read_weights(path)["model.layers.0.mlp.up_proj.weight"].float()
    replace["blk.0.ffn_up.weight"] = (ref_quantize(w_up.numpy(), GT.BF16), GT.BF16)
    expected["model.layers.0.mlp.up_proj.weight"] = w_up.bfloat16().float()
    head = random_blocks("q6_k", *stored["output.weight"].data.shape, seed=99, scale=1e-3)
    replace["output.weight"] = (head, GT.Q6_K)  # run on the file's blocks, as llama.cpp does
    expected["lm_head.weight"] = torch.from_numpy(dequantize(head, GT.Q6_K)).reshape(stored["output.weight"].data.shape)
    model, _ = load_gguf(rewrite(base, tmp_path / "k.gguf", replace=replace), "fp32")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.v_proj, QuantizedLinear) and attn.v_proj.fmt.name == "q6_k"
    assert attn.q_proj.fmt.name == "q4_k" and model.model.layers[1].self_attn.k_proj.fmt.name == "q5_k"
    assert model.model.layers[1].self_attn.q_proj.fmt.name == "q3_k"
    assert model.model.layers[1].self_attn.v_proj.fmt.name == "q2_k"
    assert isinstance(mlp.up_proj, torch.nn.Linear)  # the BF16 tensor, as a float weight
    assert not [n for n, _ in model.named_parameters() if "layers" in n and "proj" in n and "up_proj" not in n]
    assert np.array_equal(mlp.down_proj.blocks.numpy(), replace["blk.0.ffn_down.weight"][0])  # the file's bytes
    assert isinstance(model.lm_head, QuantizedLinear) and np.array_equal(model.lm_head.blocks.numpy(), head)
    ref = logits(reference_with(path, lambda name, w: expected.get(name, w)), tokens)
    got = logits(model, tokens)  # 24 rows: the Q8_K GEMV
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=1e-5)  # the same weights
    dequant_linear = qmatmul.dequant_linear

    def rounded_activations(x2: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
        q, d = (quantize_activations(x2) if qt.fmt.kind == "q8_0" else quantize_activations_q8k(x2)[:2])
        return dequant_linear((q * d[..., None]).view_as(x2), qt)

    monkeypatch.setattr(qmatmul, "dequant_linear", rounded_activations)
    rounded = logits(model, tokens)
    # All the GEMV's departure from the exact logits is the activations' rounding: it lands nearer the model with
    # rounded activations than that model is to the exact one (not at it: this random network is sensitive enough
    # that fp32 summation order flips some roundings, and a 1e-6 nudge of the embeddings moves logits by ~0.5%).
    assert 0 < (got - rounded).norm() <= 0.5 * (rounded - ref).norm()
    assert (got - ref).norm() <= 0.1 * ref.norm()


@pytest.mark.parametrize("qtype", [GT.Q8_0, GT.Q6_K])
def test_tied_token_table_stays_quantized_and_the_head_reads_its_blocks(checkpoint, tmp_path, tokens, qtype,
                                                                         monkeypatch):
    """A tied GGUF's token_embd stays as the file's blocks: a lookup gives gguf's dequantization of the rows it
    gathers, the head is a QuantizedLinear over the same storage (no float table, no Q8_0 copy), and the logits are
    the model's with the dequantized table, exactly through dequant + GEMM."""
    path = checkpoint("llama", hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    base = export_gguf(path, tmp_path / "f32.gguf", "f32")
    stored = {t.name: t for t in gguf.GGUFReader(base).tensors}
    assert "output.weight" not in stored
    rows, k = stored["token_embd.weight"].data.shape
    if qtype == GT.Q8_0:
        blocks = ref_quantize(read_weights(path)["model.embed_tokens.weight"].float().numpy(), GT.Q8_0)
    else:
        blocks = random_blocks("q6_k", rows, k, seed=3, scale=1e-3)
    table = torch.from_numpy(dequantize(blocks, qtype)).reshape(rows, k)
    model, _ = load_gguf(rewrite(base, tmp_path / "t.gguf", replace={"token_embd.weight": (blocks, qtype)}), "fp32")
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantizedEmbedding) and isinstance(model.lm_head, QuantizedLinear)
    assert model.lm_head.blocks.data_ptr() == embed.blocks.data_ptr()  # one table, read by both
    assert np.array_equal(embed.blocks.numpy(), blocks.reshape(rows, -1))
    assert torch.equal(embed(tokens), table[tokens])
    tied = ("model.embed_tokens.weight", "lm_head.weight")
    ref = logits(reference_with(path, lambda name, w: table.clone() if name in tied else w), tokens)
    monkeypatch.setattr(qmatmul, "kernel_for", lambda *_: "dequant")
    torch.testing.assert_close(logits(model, tokens), ref, atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_survives_export(checkpoint, tmp_path, tokens):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    path = checkpoint("llama", rope_scaling=scaling)
    model, _ = load_gguf(export_gguf(path, tmp_path / "m.gguf", "f32"), "fp32")
    torch.testing.assert_close(logits(model, tokens), logits(load_model(path, "fp32"), tokens), atol=1e-5, rtol=1e-5)


def test_gguf_tokenizer_matches_original(checkpoint, tmp_path):
    path = checkpoint("llama")
    gguf_path = export_gguf(path, tmp_path / "m.gguf", "f16")
    model, tok = edgellm.load(gguf_path, "fp32")  # the ordinary entry point dispatches on the suffix
    original = Tokenizer(path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == original.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == original.decode(ids)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.encode_chat(messages) == original.encode_chat(messages)
    assert tok.eos_token_ids == original.eos_token_ids and tok.bos_token == original.bos_token
    assert model.path == gguf_path and model.name == "m" and len(model.fingerprint) == 32


def test_builtin_tokenizer_roundtrips_through_gguf_metadata(tmp_path):
    from edgellm.assets import default_model_path
    path = default_model_path()
    writer = gguf.GGUFWriter(tmp_path / "tok.gguf", "llama")
    add_tokenizer(writer, path, 8192)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(tmp_path / "tok.gguf").fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.eot_token_id"].contents() == 6  # <|end|> stops chat turns
    tok, original = gguf_tokenizer(open_gguf(tmp_path / "tok.gguf"), tmp_path / "tok.gguf"), Tokenizer(path)
    for text in [*TEXTS, Path(__file__).read_text(encoding="utf-8")[:3000]]:
        assert tok.encode(text) == original.encode(text)
    assert tok.chat_template == original.chat_template and tok.eos_token_ids == original.eos_token_ids


def test_llama3_style_pre_tokenizer_roundtrips(checkpoint, tmp_path):
    path = checkpoint("llama")
    backend = Tokenizer(path).backend
    llama3 = type(backend)(models.BPE(ignore_merges=True))
    llama3.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama3.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=376, special_tokens=["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>",
                                                                  "<|system|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    llama3.train_from_iterator(SAMPLE_TEXT, trainer)
    llama3.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    llama3.save(str(path / "tokenizer.json"))
    gguf_path = export_gguf(path, tmp_path / "m.gguf", "f16")
    tok = gguf_tokenizer(open_gguf(gguf_path), gguf_path)
    assert gguf.GGUFReader(gguf_path).get_field("tokenizer.ggml.pre").contents() == "llama-bpe"
    for text in TEXTS:
        assert tok.encode(text) == Tokenizer(path).encode(text), text


def test_sentencepiece_vocabulary_matches_sentencepiece(tmp_path):
    """A llama-style (`tokenizer.ggml.model` llama) vocabulary, written as llama.cpp's converter writes one."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SAMPLE_TEXT), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1,
        eos_id=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ids = range(sp.vocab_size())
    writer = gguf.GGUFWriter(tmp_path / "sp.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                            for i in ids])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    tok = gguf_tokenizer(open_gguf(tmp_path / "sp.gguf"), tmp_path / "sp.gguf")
    for text in [*TEXTS, "€ unseen ☃ chars", " leading space"]:
        assert tok.encode(text) == [1, *sp.encode(text)], text
        assert tok.decode(tok.encode(text)) == text


def test_unsupported_tensor_type_is_named(checkpoint, tmp_path):
    base = export_gguf(checkpoint("llama"), tmp_path / "m.gguf", "f16")
    q8_1 = np.zeros((128, 2 * gguf.GGML_QUANT_SIZES[GT.Q8_1][1]), dtype=np.uint8)  # llama.cpp's activation type
    bad = rewrite(base, tmp_path / "q8_1.gguf", replace={"blk.0.ffn_up.weight": (q8_1, GT.Q8_1)})
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_up\.weight has GGUF type Q8_1.*Q4_K"):
        load_gguf(bad)


def test_unsupported_architecture_is_named(checkpoint, tmp_path):
    base = export_gguf(checkpoint("llama"), tmp_path / "m.gguf", "f16")
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2' is not supported; supported: llama"):
        load_gguf(rewrite(base, tmp_path / "gpt2.gguf", arch="gpt2"))


def test_truncated_or_foreign_files_raise_gguf_error(checkpoint, tmp_path):
    data = export_gguf(checkpoint("llama"), tmp_path / "m.gguf", "q8_0").read_bytes()
    for cut in (3, 24, 5000, len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=r"not a readable GGUF file|incomplete|inconsistent"):
            load_gguf(bad)
    (tmp_path / "text.gguf").write_text("not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_gguf(tmp_path / "text.gguf")
    with pytest.raises(GGUFError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


def test_cli_export_gguf(checkpoint, tmp_path, capsys):
    path = checkpoint("llama")
    capsys.readouterr()  # transformers' save progress bar
    assert main(["export-gguf", str(path), str(tmp_path / "m.gguf"), "--type", "q5_k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown GGUF export type 'q5_k'" in err
    assert not list(tmp_path.glob("m.gguf*"))
    assert main(["export-gguf", str(path), str(tmp_path / "m.gguf"), "--type", "q4_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))
    q4 = load_gguf(tmp_path / "m.gguf", "fp32")[0]
    assert q4.fingerprint != load_gguf(export_gguf(path, tmp_path / "f16.gguf"), "fp32")[0].fingerprint
    assert q4.fingerprint == load_gguf(tmp_path / "m.gguf", "fp32")[0].fingerprint


def test_generation_through_the_engine_matches(checkpoint, tmp_path):
    path = checkpoint("llama")
    model, tok = edgellm.load(export_gguf(path, tmp_path / "m.gguf", "f32"), "fp32")
    reference, ref_tok = edgellm.load(path, "fp32")
    out = edgellm.generate(model, tok, "def fibonacci(n):", 12)
    assert out.tokens == edgellm.generate(reference, ref_tok, "def fibonacci(n):", 12).tokens
    assert len(out.tokens) > 0


def test_llama_cpp_runs_the_exported_builtin_model(tmp_path):
    """llama.cpp itself (when llama-cpp-python is installed) tokenizes and greedy-decodes the export as edgellm."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from edgellm.assets import default_model_path
    prompt = "def add(a, b):"
    for ftype in ("f16", "q8_0"):
        gguf_path = export_gguf(default_model_path(), tmp_path / f"{ftype}.gguf", ftype)
        model, tok = edgellm.load(gguf_path, "fp32")
        expected = edgellm.generate(model, tok, prompt, 16).tokens
        llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, n_threads=1, verbose=False)
        ids = llm.tokenize(prompt.encode(), add_bos=True)
        assert ids == tok.encode(prompt)
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            got.append(token)
            if len(got) == len(expected):
                break
        assert got == expected, ftype


def test_edgellm_runs_llama_cpp_quantized_files(tmp_path):
    """llama-quantize's Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0 mix) and Q4_0 files decode in edgellm as in llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    from edgellm.assets import default_model_path
    prompt = "def add(a, b):"
    f16 = export_gguf(default_model_path(), tmp_path / "f16.gguf", "f16")
    for name, ftype in (("q4_k_m", 15), ("q4_0", 2)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 1
        out = tmp_path / f"{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) == 0
        model, tok = edgellm.load(out, "fp32")
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False, logits_all=True)
        ids = llm.tokenize(prompt.encode(), add_bos=True)
        assert ids == tok.encode(prompt)
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            got.append(token)
            if len(got) == 16:
                break
        # llama.cpp's greedy continuation, teacher-forced through both engines: the same argmax at every position
        # where llama.cpp's top two logits are 0.05 or more apart (a closer pair is a tie that summation order
        # or llama.cpp's f16 KV cache may break either way), and logits within 2% of their range.
        seq = ids + got
        llm.reset()
        llm.eval(seq)
        theirs = torch.tensor(np.array(llm.scores[:len(seq)]))[len(ids) - 1:-1]
        ours = model(torch.tensor([seq]))[0, len(ids) - 1:-1]
        assert (ours - theirs).abs().max() <= 0.02 * theirs.abs().max(), name
        top2 = theirs.topk(2).values
        clear = top2[:, 0] - top2[:, 1] >= 0.05
        assert clear.sum() >= len(got) - 3, name  # the check is not vacuous
        assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear]), name


def test_info_reads_a_gguf_header(checkpoint, tmp_path, capsys):
    gguf_path = export_gguf(checkpoint("llama"), tmp_path / "m.gguf", "q8_0")
    assert main(["info", str(gguf_path)]) == 0
    out = capsys.readouterr().out
    assert "GGUF" in out and "Q8_0" in out and "layers: 2" in out


def test_bench_speed_refuses_quantized_models_with_a_pointer(checkpoint, tmp_path, capsys):
    gguf_path = export_gguf(checkpoint("llama"), tmp_path / "m.gguf", "q8_0")
    capsys.readouterr()
    assert main(["bench", "speed", "--model", str(gguf_path), "--no-transformers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bench quant" in err[0]


def mapping_rss(address: int) -> int:
    """Resident bytes of this process's memory mapping that contains `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the address")


def test_release_drops_a_replaced_tensors_pages_from_the_process(tmp_path):
    """Q/K rows reordered at load are copies: the mapped originals must not stay resident beside them, and a
    released range still reads back the file's bytes."""
    writer = gguf.GGUFWriter(tmp_path / "big.gguf", "llama")
    values = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    writer.add_tensor("blk.0.attn_q.weight", values)
    writer.add_tensor("blk.0.attn_k.weight", values[:8].copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_gguf(tmp_path / "big.gguf")
    big, small = reader.tensors
    big.data.sum(), small.data.sum()  # touch every page
    address = big.data.ctypes.data
    before = mapping_rss(address)
    reader.release(big)
    assert before - mapping_rss(address) >= big.data.nbytes - 2 * 4096
    np.testing.assert_array_equal(big.data.view(np.float32).reshape(512, 1024), values)

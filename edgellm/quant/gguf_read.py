"""Load a llama.cpp GGUF file (llama, qwen2, qwen3 and the MoE qwen2moe, qwen3moe, olmoe, gpt-oss and Mixtral as
llama with experts) as an edgellm model and tokenizer.

Q8_0, Q4_0, MXFP4, Q4_1, Q5_0, Q5_1, IQ4_NL and k-quant (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) projections and output
heads stay quantized: their raw GGUF blocks are edgellm's block layout, memory-mapped without a copy. Where a type's
native GEMV lacks its SIMD path, that type is dequantized at load into the model dtype with gguf's reference code
instead (more memory, same logits as llama.cpp up to rounding). Anything else is refused by name. A layer's experts,
stored as one (n_expert, out, in) tensor per projection, become one weight per expert over its own run of blocks,
so a decode step reads only the chosen experts' bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from edgellm.errors import UnsupportedModelError
from edgellm.kernels.ggml_blocks import gemv_simd
from edgellm.kernels.runtime import resolve_dtype, warm_kernels
from edgellm.models import family_for
from edgellm.quant.formats import QuantizedTensor, WeightFormat
from edgellm.quant.gguf import (
    ARCHITECTURES,
    PRE_TOKENIZERS,
    ROPE_FREQS,
    GGUFError,
    expert_name,
    gguf_name,
    hf_name,
    qk_heads,
    unpermute_qk,
)
from edgellm.quant.gguf_file import GGUFFile, GGUFTensor, field, gguf_config, open_gguf
from edgellm.quant.linear import PROJECTIONS, QuantizedEmbedding, QuantizedLinear, prepare_quantized, quantize_lm_head
from edgellm.tokenizer import Tokenizer

KEPT_QUANTIZED = {GT.Q8_0: "q8_0", GT.Q4_0: "q4_0", GT.MXFP4: "mxfp4", GT.Q4_1: "q4_1", GT.Q5_0: "q5_0",
                  GT.Q5_1: "q5_1", GT.IQ4_NL: "iq4_nl", GT.Q4_K: "q4_k", GT.Q5_K: "q5_k", GT.Q6_K: "q6_k",
                  GT.Q2_K: "q2_k", GT.Q3_K: "q3_k"}
# Blocks only with the SIMD GEMV: without it, decoding from their blocks (the portable GEMV, or dequantizing per call)
# measured 3-6x slower than the float weight these types were loaded as before it existed.
NEED_SIMD = (GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.IQ4_NL, GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.Q2_K, GT.Q3_K)
FLOATS = {GT.F32: torch.float32, GT.F16: torch.float16, GT.BF16: torch.bfloat16}
SUPPORTED = ", ".join(t.name for t in (*FLOATS, *KEPT_QUANTIZED))
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
def kept_as_blocks(qtype: GT) -> bool:
    """Whether a 2-D weight of a kept type stays as its blocks here (see NEED_SIMD)."""
    return qtype not in NEED_SIMD or gemv_simd(KEPT_QUANTIZED[qtype])


def read_tensor(t: GGUFTensor, dtype: torch.dtype, path: Path, keep_quantized: bool) -> torch.Tensor | QuantizedTensor:
    """One GGUF tensor: kept as blocks, viewed as floats, or dequantized; anything else is a one-line error."""
    shape = t.shape
    if t.tensor_type in FLOATS:  # a view of the mapped bytes; `.to` copies only if the dtype differs
        return torch.from_numpy(t.data).view(FLOATS[t.tensor_type]).reshape(shape).to(dtype)
    if t.tensor_type in KEPT_QUANTIZED and keep_quantized and len(shape) == 2 and kept_as_blocks(t.tensor_type):
        blocks = torch.from_numpy(t.data).reshape(shape[0], -1)
        return QuantizedTensor(WeightFormat.gguf(KEPT_QUANTIZED[t.tensor_type]), shape, {"blocks": blocks})
    if t.tensor_type in KEPT_QUANTIZED:
        return torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(shape).to(dtype)
    raise UnsupportedModelError(f"{path}: tensor {t.name} has GGUF type {t.tensor_type.name}, which edgellm cannot "
                                f"load; supported types: {SUPPORTED} (requantize the model, e.g. to Q4_K_M or Q8_0)")


def read_weights(reader: GGUFFile, config: dict, dtype: torch.dtype,
                 path: Path) -> tuple[dict[str, torch.Tensor | QuantizedTensor], torch.Tensor | None]:
    """HF-named weights (Q/K rows back in HF order) and llama.cpp's rope frequency divisors if the file has them."""
    arch = field(reader, "general.architecture")
    permuted = ARCHITECTURES[arch][2]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights: dict[str, torch.Tensor | QuantizedTensor] = {}
    rope_freqs = None
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            rope_freqs = read_tensor(t, torch.float32, path, keep_quantized=False)
            continue
        name = hf_name(t.name, arch)
        if name is None:
            raise UnsupportedModelError(f"{path}: GGUF tensor {t.name} is not part of a {config['model_type']} "
                                        "model edgellm implements")
        # The projections, the head and the token table stay quantized as stored, as llama.cpp runs them (a tied
        # head reads the table's blocks); a float head is run as Q8_0 by quantize_lm_head.
        kept = name in ("lm_head.weight", "model.embed_tokens.weight") or name.rsplit(".", 2)[-2] in PROJECTIONS
        if "_exps." in t.name:  # stacked experts (and their biases): each expert's rows are a contiguous run
            for e in range(t.shape[0]):
                expert = GGUFTensor(t.name, t.tensor_type, t.shape[1:], t.data[e])
                weights[expert_name(name, e)] = read_tensor(expert, dtype, path, keep_quantized=kept)
            continue
        w = read_tensor(t, dtype, path, keep_quantized=kept)
        if name.endswith(".shared_expert_gate.weight"):  # llama.cpp reads it as a vector; HF's is one row
            w = w.reshape(1, -1)
        n = qk_heads(name, heads, kv_heads) if permuted else None
        if n is not None:
            if isinstance(w, QuantizedTensor):
                w.data = {k: unpermute_qk(v, n) for k, v in w.data.items()}
            else:
                w = unpermute_qk(w, n)
            reader.release(t)
        weights[name] = w
    return weights, rope_freqs


def gguf_fingerprint(reader: GGUFFile, samples: int = 32, sample_bytes: int = 4096) -> str:
    """Hash of the whole header (metadata, tensor table) and evenly spaced samples of the tensor bytes."""
    data = reader.map
    h = hashlib.sha256(data[:reader.data_offset])
    size = len(data) - reader.data_offset
    for i in range(samples):
        start = reader.data_offset + size * i // samples
        h.update(data[start:start + sample_bytes])
    return h.hexdigest()[:32]


def install_weights(model: nn.Module, weights: dict[str, torch.Tensor | QuantizedTensor], path: Path,
                    dtype: torch.dtype, arch: str) -> None:
    """Assign float tensors to the meta-device model and swap projections for QuantizedLinear over the blocks (the
    token table for a QuantizedEmbedding, which dequantizes the rows it looks up to `dtype`)."""
    expected = dict(model.state_dict())
    if model.args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise GGUFError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]}; the GGUF file is incomplete")
    for name, w in weights.items():
        if name not in expected:
            raise GGUFError(f"{path}: tensor {gguf_name(name, arch)} does not belong in this "
                            f"{model.args.model_type} model; the file is inconsistent with its metadata")
        if tuple(w.shape) != tuple(expected[name].shape):
            raise GGUFError(f"{path}: tensor {name} has shape {tuple(w.shape)}, which the GGUF metadata does not "
                            "imply; the file is inconsistent")
    modules = {k.removesuffix(".weight") for k, v in weights.items() if isinstance(v, QuantizedTensor)}
    biases = {f"{m}.bias": weights.pop(f"{m}.bias", None) for m in modules}
    model.load_state_dict({k: v for k, v in weights.items() if not isinstance(v, QuantizedTensor)},
                          assign=True, strict=False)
    for m in modules:
        parent, _, child = m.rpartition(".")
        qt = weights[f"{m}.weight"]
        setattr(model.get_submodule(parent), child, QuantizedEmbedding(qt, dtype) if m == "model.embed_tokens"
                else QuantizedLinear.from_quantized(qt, biases[f"{m}.bias"]))


def load_gguf(path: str | Path, dtype: str | torch.dtype | None = None,
              device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """Model and tokenizer from a GGUF file, like `edgellm.load` gives for a HF directory."""
    path = Path(path)
    if device != "cpu":
        raise GGUFError(f"GGUF models load on the CPU only, not {device!r}")
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    family = family_for(config)
    args = family.ModelArgs.from_config(config)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = family.Model(args)
    weights, rope_freqs = read_weights(reader, config, dtype, path)
    install_weights(model, weights, path, dtype, field(reader, "general.architecture"))
    model.tie_weights()
    model.fuse()
    prepare_quantized(model)
    quantize_lm_head(model)
    model.rope.inv_freq = model.rope.inv_freq.to(device)
    if rope_freqs is not None:  # llama.cpp divides each rotary frequency by its factor (Llama 3.1 scaling)
        model.rope.inv_freq = model.rope.inv_freq / rope_freqs.to(device)
    model.name = path.stem
    model.path = path
    model.fingerprint = gguf_fingerprint(reader)
    warm_kernels(dtype, device)
    return model.eval().requires_grad_(False), gguf_tokenizer(reader, path)


def bpe_backend(reader: GGUFFile, tokens: list[str], path: Path) -> HFTokenizer:
    """Byte-level BPE (`tokenizer.ggml.model` gpt2) from the vocabulary, merges and pre-tokenizer name."""
    pre_name = field(reader, "tokenizer.ggml.pre", "gpt-2")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise UnsupportedModelError(f"{path}: GGUF pre-tokenizer {pre_name!r} is not supported; "
                                    f"supported: {', '.join(PRE_TOKENIZERS)}")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
    backend = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    if pre.regex is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    else:
        steps = [pre_tokenizers.Split(Regex(pre.regex), "isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if pre.split_digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def spm_backend(reader: GGUFFile, tokens: list[str], types: list[int], path: Path) -> HFTokenizer:
    """SentencePiece BPE (`tokenizer.ggml.model` llama): merges ranked by the merged piece's score, as
    transformers' LlamaConverter builds them, with byte fallback for characters outside the vocabulary."""
    scores = field(reader, "tokenizer.ggml.scores")
    if scores is None:
        raise GGUFError(f"{path}: tokenizer.ggml.scores is missing; a SentencePiece vocabulary needs its scores")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges = []
    for piece, pid in vocab.items():
        if types[pid] != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((scores[pid], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = tokens[field(reader, "tokenizer.ggml.unknown_token_id", 0)]
    backend = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    prefix = field(reader, "tokenizer.ggml.add_space_prefix", True)
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def tokenizer_fingerprint(reader: GGUFFile) -> str:
    h = hashlib.sha256()
    for key, (start, end) in reader.spans.items():
        if key.startswith("tokenizer."):
            h.update(reader.map[start:end])
    return h.hexdigest()[:32]


def gguf_tokenizer(reader: GGUFFile, path: Path) -> Tokenizer:
    """The GGUF file's embedded vocabulary as an edgellm Tokenizer (BOS/EOS, special tokens, chat template)."""
    kind = field(reader, "tokenizer.ggml.model")
    tokens = field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise GGUFError(f"{path} has no embedded tokenizer (tokenizer.ggml.model/tokens); re-export it with one")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = bpe_backend(reader, tokens, path)
    elif kind == "llama":
        backend = spm_backend(reader, tokens, types, path)
    else:
        raise UnsupportedModelError(f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: gpt2 "
                                    "(byte-level BPE), llama (SentencePiece)")
    special = [AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False)
               for i in range(len(tokens)) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    backend.add_special_tokens([t for t in special if t.special])
    backend.add_tokens([t for t in special if not t.special])

    def token(key: str) -> tuple[int | None, str | None]:
        tid = field(reader, f"tokenizer.ggml.{key}_token_id")
        return (tid, tokens[tid]) if tid is not None and 0 <= tid < len(tokens) else (None, None)

    bos_id, bos = token("bos")
    eos_id, eos = token("eos")
    if field(reader, "tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        if field(reader, "tokenizer.ggml.add_eos_token", False) and eos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {bos} $B {eos}",
                special_tokens=[(bos, bos_id), (eos, eos_id)])
        else:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    eos_ids = {tid for tid in (eos_id, token("eot")[0], token("eom")[0]) if tid is not None}
    return Tokenizer.from_backend(backend, eos_ids, tokenizer_fingerprint(reader), bos_token=bos, eos_token=eos,
                                  chat_template=field(reader, "tokenizer.chat_template"))

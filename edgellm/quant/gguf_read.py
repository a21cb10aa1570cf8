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
import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
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
    MIXTRAL,
    PRE_TOKENIZERS,
    RENORMALIZED,
    ROPE_FREQS,
    GGUFError,
    expert_name,
    gguf_name,
    hf_name,
    qk_heads,
    unpermute_qk,
)
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
GGUF_MAGIC = 0x46554747  # b"GGUF" read as little-endian uint32
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class GGUFTensor:
    """One tensor of the file: its raw bytes, memory-mapped, as rows of ggml's innermost dimension."""

    name: str
    tensor_type: GT
    shape: tuple[int, ...]  # [out, in] as torch/HF order it: ggml's dimensions reversed
    data: np.ndarray  # uint8 [..., bytes per row]


class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed straight from a copy-on-write memory map.

    gguf.GGUFFile makes several numpy views per metadata value, which takes minutes for a 128k-token
    vocabulary with 280k merges; struct-unpacking the strings takes about a second. The map is private
    (copy-on-write), so torch takes tensors from it without a copy and without a read-only warning.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.pos = 0
        magic, version = self._unpack("<II")
        if magic != GGUF_MAGIC:
            raise ValueError("no GGUF magic at the start of the file")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._unpack("<QQ")
        self.fields: dict[str, Any] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # byte range of each key/value, for fingerprints
        for _ in range(n_kv):
            start = self.pos
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I")[0])
            self.spans[key] = (start, self.pos)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = self._unpack(f"<{self._unpack('<I')[0]}Q")
            infos.append((name, dims, *self._unpack("<IQ")))
        align = self.fields.get("general.alignment", 32)
        self.data_offset = -(-self.pos // align) * align
        self.tensors = [self._tensor(*info) for info in infos]
        self.base = np.frombuffer(self.map, np.uint8, 1).ctypes.data

    def release(self, t: GGUFTensor) -> None:
        """Drop a tensor's mapped pages from this process once a copy has replaced it (Q/K rows reordered at
        load): touched to make the copy, they would otherwise stay resident beside it for the process's life.
        Only whole pages inside the tensor go, so a neighbour's pages stay mapped."""
        start = t.data.ctypes.data - self.base
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (start + t.data.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > first:
            self.map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.map, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        raw = self.map[self.pos:self.pos + n]
        if len(raw) != n:
            raise ValueError("a string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self._string()
        if vtype != ARRAY:
            return self._unpack("<" + SCALARS[vtype])[0]
        etype, count = self._unpack("<IQ")
        if etype in (STRING, ARRAY):
            return [self._value(etype) for _ in range(count)]
        dtype = np.dtype("<" + SCALARS[etype])
        if self.pos + count * dtype.itemsize > len(self.map):
            raise ValueError("an array runs past the end of the file")
        values = np.frombuffer(self.map, dtype, count, self.pos).tolist()
        self.pos += count * dtype.itemsize
        return values

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> GGUFTensor:
        qtype = GT(raw_type)
        block, size = GGML_QUANT_SIZES[qtype]
        if not dims or dims[0] % block:
            raise ValueError(f"tensor {name} has rows of {dims[0] if dims else 0}, not whole {qtype.name} blocks")
        row_bytes = dims[0] // block * size
        nbytes = row_bytes * math.prod(dims[1:])
        start = self.data_offset + offset
        if start + nbytes > len(self.map):
            raise ValueError(f"tensor {name} runs past the end of the file")
        data = np.frombuffer(self.map, np.uint8, nbytes, start).reshape(*reversed(dims[1:]), row_bytes)
        return GGUFTensor(name, qtype, tuple(reversed(dims)), data)


def open_gguf(path: Path) -> GGUFFile:
    """The parsed GGUF header with memory-mapped tensors, or a GGUFError for a damaged or truncated file."""
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    try:
        return GGUFFile(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, OSError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file ({e}); it may be truncated or damaged, "
                        "re-download or re-export it") from e


def field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def gguf_config(reader: GGUFFile, path: Path) -> dict:
    """An HF-style config.json dict from the GGUF hyper-parameters, so ModelArgs.from_config reads it as usual."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; "
                                    f"supported: {', '.join(ARCHITECTURES)}")
    hf_arch, model_type, _ = ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: GGUF metadata {arch}.{key} is missing; the file is incomplete")
        return value

    n_heads = get("attention.head_count")
    hidden = get("embedding_length")
    rope_dims = field(reader, f"{arch}.rope.dimension_count")
    head_dim = field(reader, f"{arch}.attention.key_length") or rope_dims or hidden // n_heads
    if rope_dims not in (None, head_dim):
        raise UnsupportedModelError(f"{path}: rotary embedding over {rope_dims} of {head_dim} head dims (partial "
                                    "rotary) is not supported")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{path} has no token_embd.weight tensor; the GGUF file is incomplete")
    vocab = names["token_embd.weight"].shape[0]  # embedding rows, which may exceed the tokenizer's vocabulary
    config = {
        "architectures": [hf_arch], "model_type": model_type,
        "hidden_size": hidden, "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"), "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": get("context_length", 2048), "rope_theta": get("rope.freq_base", 10000.0),
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    if arch in RENORMALIZED:  # an architecture that may carry experts
        config.update(moe_config(reader, arch, names, path))
        if arch == "llama" and "num_experts" in config:
            config["architectures"], config["model_type"] = [MIXTRAL[0]], MIXTRAL[1]
    if arch == "gpt-oss":
        config.update(gpt_oss_config(get))
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling == "yarn":
        config["rope_scaling"] = yarn_config(reader, arch, path)
    elif scaling != "none":
        raise UnsupportedModelError(f"{path}: GGUF rope scaling {scaling!r} is not supported; supported: linear, "
                                    "yarn, llama3 (rope_freqs)")
    return config


def gpt_oss_config(get: Callable[[str], Any]) -> dict:
    """gpt-oss's config.json keys. llama.cpp fixes what the file does not say: every even layer slides (HF's default
    layer_types), top-k-then-softmax routing, the SwiGLU's alpha 1.702 and limit 7 (ModelArgs' defaults)."""
    return {"num_local_experts": get("expert_count"), "num_experts_per_tok": get("expert_used_count"),
            "intermediate_size": get("expert_feed_forward_length"), "sliding_window": get("attention.sliding_window"),
            "attention_bias": True, "split_gate_up": True}


def yarn_config(reader: GGUFFile, arch: str, path: Path) -> dict:
    """transformers' YaRN rope_scaling as llama.cpp runs it: the correction range always rounded outward
    (truncate), attention factor 0.1·ln(factor) + 1; a file asking for other YaRN factors is refused."""
    for key, default in (("attn_factor", 1.0), ("yarn_attn_factor", 1.0), ("yarn_ext_factor", 1.0),
                         ("yarn_log_multiplier", 0.0)):
        value = field(reader, f"{arch}.rope.scaling.{key}", default)
        if value != default:
            raise UnsupportedModelError(f"{path}: GGUF {arch}.rope.scaling.{key} = {value} is not supported "
                                        f"(only {default})")
    scaling = {"rope_type": "yarn", "truncate": True}
    for key, hf, default in (("factor", "factor", None), ("original_context_length",
                             "original_max_position_embeddings", None), ("yarn_beta_fast", "beta_fast", 32.0),
                             ("yarn_beta_slow", "beta_slow", 1.0)):
        scaling[hf] = field(reader, f"{arch}.rope.scaling.{key}", default)
        if scaling[hf] is None:
            raise GGUFError(f"{path}: GGUF metadata {arch}.rope.scaling.{key} is missing; the file is incomplete")
    return scaling


def moe_config(reader: GGUFFile, arch: str, names: dict[str, GGUFTensor], path: Path) -> dict:
    """The router's config.json keys from {arch}.expert_*; empty for a llama file without experts (a dense Llama)."""
    experts = field(reader, f"{arch}.expert_count", 0)
    if not experts:
        if arch == "llama":
            return {}
        raise GGUFError(f"{path}: GGUF metadata {arch}.expert_count is missing; the file is incomplete")
    gating = field(reader, f"{arch}.expert_gating_func", 1)
    if gating != 1:  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise UnsupportedModelError(f"{path}: expert gating function {gating} is not supported; only softmax (1) is")
    used = field(reader, f"{arch}.expert_used_count")
    if used is None:
        raise GGUFError(f"{path}: GGUF metadata {arch}.expert_used_count is missing; the file is incomplete")
    gate = names.get("blk.0.ffn_gate_exps.weight")
    config = {"num_experts": experts, "num_experts_per_tok": used, "norm_topk_prob": RENORMALIZED[arch],
              "moe_intermediate_size": field(reader, f"{arch}.expert_feed_forward_length")
              or (gate.shape[1] if gate is not None else None),
              "qkv_bias": "blk.0.attn_q.bias" in names, "clip_qkv": field(reader, f"{arch}.attention.clamp_kqv")}
    shared = names.get("blk.0.ffn_gate_shexp.weight")
    if shared is not None:
        config["shared_expert_intermediate_size"] = field(reader, f"{arch}.expert_shared_feed_forward_length",
                                                          shared.shape[0])
    return config


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

"""A GGUF file's metadata, tensor table and HF-style config, parsed without torch: `edgellm plan` and `edgellm info`
read a GGUF this way, and the loader (gguf_read.py) builds the model from the same parse."""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT

from edgellm.errors import UnsupportedModelError
from edgellm.quant.gguf import ARCHITECTURES, MIXTRAL, RENORMALIZED, GGUFError

STRING, ARRAY = 8, 9
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

"""What GGUF import (gguf_read) and export (gguf_write) share: names, the Q/K row order, pre-tokenizers.

GGUF is llama.cpp's single-file format: metadata (hyper-parameters, vocabulary, chat template) and tensors under
llama.cpp's own names. Mapping both ways keeps edgellm's model code unaware that a GGUF file exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgellm.errors import CheckpointError

if TYPE_CHECKING:  # the GGUF header reader (gguf_file.py) runs without torch
    import torch

# GGUF architecture → (HF architecture, HF model_type, whether llama.cpp's converter permuted the Q/K rows).
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe", False),
    "olmoe": ("OlmoeForCausalLM", "olmoe", False),
    "gpt-oss": ("GptOssForCausalLM", "gpt_oss", False),  # NEOX rope: HF's half-split order, nothing permuted
}
MIXTRAL = ("MixtralForCausalLM", "mixtral")  # llama.cpp stores Mixtral as arch llama with `llama.expert_count` > 0
# Whether llama.cpp renormalises the top-k router probabilities: fixed per architecture, not read from the file.
RENORMALIZED = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    # all experts of a layer in one (n_expert, out, in) tensor; `expert_name` gives one expert's HF name
    "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# Where an architecture names a layer tensor differently: gpt-oss's router is `mlp.router` (with a bias), its
# second norm `post_attention_norm`, and its attention sinks a parameter without a `.weight` suffix in HF.
ARCH_LAYER_NAMES = {"gpt-oss": {"post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router",
                                "attn_sinks": "self_attn.sinks"}}
SUFFIXLESS = ("self_attn.sinks",)  # HF parameters GGUF stores as `<name>.weight`
HF_GLOBAL_NAMES = {v: k for k, v in GLOBAL_NAMES.items()}
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors, how Llama 3.1 rope scaling is stored


def layer_names(arch: str | None) -> dict[str, str]:
    """GGUF → HF layer tensor stems of `arch` (LAYER_NAMES with the architecture's own names swapped in)."""
    own = ARCH_LAYER_NAMES.get(arch or "", {})
    return {k: v for k, v in LAYER_NAMES.items() if v not in own.values()} | own


class GGUFError(CheckpointError):
    """A GGUF file is damaged or truncated, or cannot be written as asked."""


def hf_name(name: str, arch: str | None = None) -> str | None:
    """The HF tensor name of a GGUF tensor name (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`)."""
    stem, _, suffix = name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    names = layer_names(arch)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names:
        hf = names[parts[2]]
        return f"model.layers.{parts[1]}.{hf}" + ("" if hf in SUFFIXLESS and suffix == "weight" else f".{suffix}")
    return None


def gguf_name(name: str, arch: str | None = None) -> str | None:
    """The GGUF tensor name of an HF tensor name; None for tensors GGUF does not store."""
    if name.endswith(SUFFIXLESS):
        name += ".weight"
    stem, _, suffix = name.rpartition(".")
    if stem in HF_GLOBAL_NAMES:
        return f"{HF_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".", 3)
    names = {v: k for k, v in layer_names(arch).items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in names:
        return f"blk.{parts[2]}.{names[parts[3]]}.{suffix}"
    return None


def expert_name(stacked: str, expert: int) -> str:
    """One expert's HF name from the stacked one (`...experts.up_proj.weight` → `...experts.3.up_proj.weight`)."""
    return stacked.replace(".experts.", f".experts.{expert}.", 1)


def qk_heads(name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """Heads whose rows llama.cpp interleaves in this HF tensor (q/k projections of arch llama), else None."""
    if ".self_attn.q_proj." in name:
        return n_heads
    if ".self_attn.k_proj." in name:
        return n_kv_heads
    return None


def permute_qk(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF → GGUF row order of a Q/K weight, bias or block array: each head's two rotary halves interleaved.

    HF Llama rotates dims (i, i + d/2) together; llama.cpp's rope rotates (2i, 2i + 1), so its converter
    reorders the rows. Rows are whole quantization blocks along K, so this is exact for quantized rows too.
    """
    n = rows.shape[0]
    return rows.reshape(n_heads, 2, n // n_heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def unpermute_qk(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF → HF row order: the inverse of permute_qk."""
    n = rows.shape[0]
    return rows.reshape(n_heads, n // n_heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


@dataclass(frozen=True)
class PreTokenizer:
    """A llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) and the equivalent `tokenizers` split regex."""

    regex: str | None  # None: GPT-2's own regex, i.e. ByteLevel(use_regex=True)
    ignore_merges: bool = False  # whole words found in the vocab skip the merges (Llama 3)
    split_digits: bool = False


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": PreTokenizer(None),
    "llama-bpe": PreTokenizer(LLAMA3_REGEX, ignore_merges=True),
    "llama3": PreTokenizer(LLAMA3_REGEX, ignore_merges=True),
    "qwen2": PreTokenizer(QWEN2_REGEX),
    "smollm": PreTokenizer(None, split_digits=True),
}

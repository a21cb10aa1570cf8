"""Export an edgellm (HF-format) checkpoint as a GGUF file that llama.cpp loads.

Tensors are streamed one at a time (header first, then each tensor converted and written), so peak memory is
one tensor, not the model. The file is written next to the target and renamed, so a failed export never leaves
a half-written .gguf behind.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GT
from gguf import LlamaFileType, TokenType
from tokenizers import Tokenizer as HFTokenizer

from edgellm.checkpoint import quant_format, read_config
from edgellm.errors import UnsupportedModelError
from edgellm.loader import read_weights
from edgellm.models import family_for
from edgellm.models.rope import RotaryEmbedding
from edgellm.quant.formats import GGML_BLOCK, QuantizedTensor, quantize
from edgellm.quant.gguf import (
    ARCHITECTURES,
    LLAMA3_REGEX,
    MIXTRAL,
    QWEN2_REGEX,
    RENORMALIZED,
    ROPE_FREQS,
    GGUFError,
    gguf_name,
    permute_qk,
    qk_heads,
)
from edgellm.quant.linear import projection_names

EXPORT_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}
QUANT_TYPES = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0}
QUANT_TYPES_BY_GT = {v: k for k, v in QUANT_TYPES.items()}
CARRIED_FORMATS = {**QUANT_TYPES, "mxfp4": GT.MXFP4}  # edgellm formats whose blocks are GGUF's, byte for byte
GGUF_ARCH = {model_type: arch for arch, (_, model_type, _) in ARCHITECTURES.items()} | {"mistral": "llama",
                                                                                      MIXTRAL[1]: "llama"}
EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(\w+)\.(weight|bias)")  # one expert's projection, after Model.sanitize
GATE_UP = re.compile(r"(.+\.experts\.\d+)\.gate_up_proj\.(weight|bias)")  # a gpt-oss expert's interleaved gate/up


Source = torch.Tensor | QuantizedTensor


@dataclass
class TensorPlan:
    """One tensor to write: its GGUF name, source and target type (decided before the header is written). A list
    source is a layer's experts, stacked only when written, so peak memory stays one tensor."""

    name: str
    source: Source | list[Source]
    qtype: GT

    @property
    def shape(self) -> tuple[int, ...]:
        if isinstance(self.source, list):
            return (len(self.source), *self.source[0].shape)
        return tuple(self.source.shape)

    def array(self) -> np.ndarray:
        """The tensor's bytes as GGUF stores them (numpy shape [out, in] or [n_expert, out, in], quantized rows as
        uint8 blocks)."""
        if isinstance(self.source, list):
            return np.stack([self.convert(s) for s in self.source])
        return self.convert(self.source)

    def convert(self, source: Source) -> np.ndarray:
        if isinstance(source, QuantizedTensor):
            return source.data["blocks"].contiguous().numpy()
        if self.qtype in (GT.Q8_0, GT.Q4_0):
            return quantize(source, QUANT_TYPES_BY_GT[self.qtype]).data["blocks"].numpy()
        return source.to(torch.float16 if self.qtype == GT.F16 else torch.float32).contiguous().numpy()


def target_type(name: str, tensor: torch.Tensor, ftype: str, tied: bool) -> GT:
    """llama.cpp's choice per tensor: 1-D tensors (norms, biases) and MoE routers in F32; with q4_0 the output
    projection (or the tied embedding that serves as it) in Q8_0 — llama-quantize uses Q6_K there, which gguf cannot
    write; weights whose rows are not whole 32-blocks in F16."""
    if tensor.dim() == 1 or ftype == "f32" or name.endswith(".ffn_gate_inp.weight"):
        return GT.F32
    if ftype == "f16" or tensor.shape[1] % GGML_BLOCK:
        return GT.F16
    if ftype == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return GT.Q8_0
    return QUANT_TYPES[ftype]


def stack_experts(weights: dict[str, Source]) -> dict[str, Source | list[Source]]:
    """Per-expert projections (and biases) grouped into one list per layer and projection under llama.cpp's stacked
    name (`...mlp.experts.3.up_proj.weight` → `...mlp.experts.up_proj.weight`, expert 3 at index 3)."""
    out: dict[str, Source | list[Source]] = {}
    experts: dict[str, dict[int, Source]] = {}
    for name, tensor in weights.items():
        if m := EXPERT.fullmatch(name):
            experts.setdefault(f"{m[1]}.{m[3]}.{m[4]}", {})[int(m[2])] = tensor
        else:
            out[name] = tensor
    for name, parts in experts.items():
        out[name] = [parts[e] for e in sorted(parts)]
    return out


def split_gate_up(weights: dict[str, Source]) -> dict[str, Source]:
    """gpt-oss experts' interleaved `gate_up_proj` rows (gate even, up odd) as the separate gate and up projections
    llama.cpp's converter writes; quantized rows are whole blocks along K, so this is exact for them too."""
    out: dict[str, Source] = {}
    for name, w in weights.items():
        m = GATE_UP.fullmatch(name)
        if m is None:
            out[name] = w
            continue
        for proj, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
            out[f"{m[1]}.{proj}.{m[2]}"] = QuantizedTensor(w.fmt, (w.shape[0] // 2, w.shape[1]), {
                "blocks": w.data["blocks"][rows]}) if isinstance(w, QuantizedTensor) else w[rows]
    return out


def plan_tensors(weights: dict[str, Source], config: dict, arch: str, ftype: str, path: Path) -> list[TensorPlan]:
    """GGUF names, Q/K rows in llama.cpp's order and target types for every tensor of the checkpoint."""
    permuted = ARCHITECTURES[arch][2]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    tied = bool(config.get("tie_word_embeddings"))
    plans = []
    for hf, tensor in stack_experts(split_gate_up(weights)).items():
        if "rotary_emb.inv_freq" in hf or (tied and hf == "lm_head.weight"):
            continue
        name = gguf_name(hf, arch)
        if name is None:
            raise UnsupportedModelError(f"{path}: tensor {hf} has no GGUF equivalent; cannot export it")
        if isinstance(tensor, list):  # experts: blocks carried or float quantized as a 2-D weight would be
            first = tensor[0]
            qtype = CARRIED_FORMATS[first.fmt.name] if isinstance(first, QuantizedTensor) \
                else target_type(name, first, ftype, tied)
            plans.append(TensorPlan(name, tensor, qtype))
            continue
        if name.endswith(".ffn_gate_inp_shexp.weight"):  # HF's (1, hidden) row is the vector llama.cpp reads
            tensor = tensor.reshape(-1)
        n = qk_heads(hf, heads, kv_heads) if permuted else None
        if isinstance(tensor, QuantizedTensor):
            if n is not None:
                tensor = QuantizedTensor(tensor.fmt, tensor.shape, {"blocks": permute_qk(tensor.data["blocks"], n)})
            plans.append(TensorPlan(name, tensor, CARRIED_FORMATS[tensor.fmt.name]))
            continue
        if n is not None:
            tensor = permute_qk(tensor, n)
        plans.append(TensorPlan(name, tensor, target_type(name, tensor, ftype, tied)))
    return plans


def pre_tokenizer_name(spec: dict | None, path: Path) -> str:
    """The llama.cpp `tokenizer.ggml.pre` whose split regex equals this tokenizer.json pre-tokenizer."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return "gpt-2"  # GPT-2's regex, which llama.cpp runs for pre 'gpt-2'
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and steps[0].get("behavior") == "Isolated"):
        regex = steps[0].get("pattern", {}).get("Regex")
        names = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
        if regex in names:
            return names[regex]
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True)):
        return "smollm"
    raise UnsupportedModelError(f"{path}: the tokenizer's pre-tokenizer {json.dumps(spec)[:120]} has no llama.cpp "
                                "equivalent; GGUF export supports GPT-2, Llama 3, Qwen2 and SmolLM byte-level BPE")


def add_tokenizer(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template as llama.cpp reads them."""
    file = path / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        backend = HFTokenizer.from_file(str(file))
    except Exception as e:  # OSError, JSONDecodeError, or the plain Exception tokenizers raises on parse errors
        raise GGUFError(f"{file} cannot be read ({e}); GGUF export needs the model's tokenizer.json") from e
    model = spec.get("model", {})
    if model.get("type") != "BPE" or spec.get("normalizer") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedModelError(f"{file}: only byte-level BPE tokenizers can be exported to GGUF")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), path)
    tokens: list[str | None] = [None] * max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
    types = [TokenType.NORMAL] * len(tokens)
    for token, tid in model["vocab"].items():
        tokens[tid] = token
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    for i, token in enumerate(tokens):
        if token is None:  # embedding rows past the vocabulary, as llama.cpp's converter names them
            tokens[i], types[i] = f"[PAD{i}]", TokenType.UNUSED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")) \
        if (path / "tokenizer_config.json").exists() else {}
    generation = json.loads((path / "generation_config.json").read_text(encoding="utf-8")) \
        if (path / "generation_config.json").exists() else {}

    def token_id(key: str) -> int | None:
        tok = config.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return backend.token_to_id(tok) if tok else None

    bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    eos_ids = generation.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
    eos = eos if eos is not None else (eos_ids[0] if eos_ids else None)
    for tid, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id), (pad, writer.add_pad_token_id)):
        if tid is not None:
            add(tid)
    others = [tid for tid in eos_ids if tid != eos]
    if others:  # a second stop token (end of turn) becomes llama.cpp's EOT, so chat generation stops there
        writer.add_eot_token_id(others[0])
    plain, special = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
    writer.add_add_bos_token(bos is not None and special[:1] == [bos] and plain[:1] != [bos])
    writer.add_add_eos_token(eos is not None and special[-1:] == [eos] and plain[-1:] != [eos])
    template = config.get("chat_template")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        writer.add_chat_template(template)


def add_hyperparameters(writer: gguf.GGUFWriter, args: Any, path: Path) -> torch.Tensor | None:
    """llama.cpp's required {arch}.* keys; returns the rope_freqs tensor for Llama 3 rope scaling, if any."""
    writer.add_name(path.name)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_vocab_size(args.vocab_size)
    rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.max_position_embeddings, args.rope_scaling)
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(args.rope_scaling["factor"]))
    elif rope.kind == "llama3":  # stored as per-frequency divisors, as llama.cpp's converter does
        return (rope._inv_freq(args.rope_theta) / rope.inv_freq).float()
    elif rope.kind == "yarn":
        add_yarn(writer, args.rope_scaling, args.max_position_embeddings, path)
    elif rope.kind != "default":
        raise UnsupportedModelError(f"{path}: rope scaling {rope.kind!r} has no GGUF equivalent; "
                                    "exportable: none, linear, llama3, yarn")
    return None


def add_yarn(writer: gguf.GGUFWriter, scaling: dict, max_position: int, path: Path) -> None:
    """YaRN's factor, original context and betas. llama.cpp always rounds the correction range outward, so a
    `truncate: false` model (gpt-oss) runs slightly differently there, as after llama.cpp's own converter; an
    explicit attention factor or DeepSeek mscale has no key llama.cpp reads the same way and is refused."""
    extra = sorted({"attention_factor", "mscale", "mscale_all_dim"} & {k for k, v in scaling.items() if v})
    if extra:
        raise UnsupportedModelError(f"{path}: YaRN rope scaling with {', '.join(extra)} cannot be exported to GGUF")
    original = int(scaling["original_max_position_embeddings"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(scaling.get("factor") or max_position / original))  # rope.py's default
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_rope_scaling_yarn_beta_fast(float(scaling.get("beta_fast") or 32.0))
    writer.add_rope_scaling_yarn_beta_slow(float(scaling.get("beta_slow") or 1.0))


def add_gpt_oss(writer: gguf.GGUFWriter, args: Any, path: Path) -> None:
    """gpt-oss's expert and window keys, refusing what llama.cpp's gpt-oss graph fixes otherwise: sliding windows on
    the even layers only, the SwiGLU's alpha 1.702 and limit 7, and an output head of its own."""
    default = [i % 2 == 0 for i in range(args.num_hidden_layers)]
    if [args.window(i) is not None for i in range(args.num_hidden_layers)] != default:
        raise UnsupportedModelError(f"{path}: llama.cpp's gpt-oss slides the window on even layers only; this "
                                    f"model's layer_types {args.extra['layer_types']} cannot be exported to GGUF")
    if (args.swiglu_alpha, args.swiglu_limit) != (1.702, 7.0):
        raise UnsupportedModelError(f"{path}: llama.cpp's gpt-oss fixes swiglu alpha 1.702 and limit 7.0; this "
                                    f"model's {args.swiglu_alpha}, {args.swiglu_limit} cannot be exported to GGUF")
    if args.tie_word_embeddings:
        raise UnsupportedModelError(f"{path}: llama.cpp's gpt-oss needs its own output.weight; a model with tied "
                                    "embeddings cannot be exported to GGUF")
    writer.add_expert_count(args.num_local_experts)
    writer.add_expert_used_count(args.num_experts_per_tok)
    writer.add_expert_feed_forward_length(args.intermediate_size)
    writer.add_sliding_window(args.sliding_window)


def add_experts(writer: gguf.GGUFWriter, args: Any, arch: str, path: Path) -> None:
    """{arch}.expert_* keys of an MoE model, refusing what llama.cpp's graph for `arch` cannot run as the model does."""
    renormalize = args.norm_topk_prob or args.model_type == MIXTRAL[1]
    if renormalize != RENORMALIZED[arch]:
        raise UnsupportedModelError(f"{path}: llama.cpp's {arch} {'always' if RENORMALIZED[arch] else 'never'} "
                                    f"renormalises the top-k expert weights, but this model's norm_topk_prob is "
                                    f"{args.norm_topk_prob}; it cannot be exported to GGUF")
    if not all(args.is_sparse(i) for i in range(args.num_hidden_layers)):
        raise UnsupportedModelError(f"{path}: dense layers between MoE layers (mlp_only_layers, decoder_sparse_step) "
                                    f"have no llama.cpp {arch} equivalent; it cannot be exported to GGUF")
    writer.add_expert_count(args.num_experts)
    writer.add_expert_used_count(args.num_experts_per_tok)
    writer.add_expert_feed_forward_length(args.expert_size)
    if args.shared_expert_intermediate_size:
        writer.add_expert_shared_feed_forward_length(args.shared_expert_intermediate_size)
    if args.clip_qkv is not None:
        writer.add_clamp_kqv(args.clip_qkv)


def checkpoint_weights(src: Path, config: dict, family: ModuleType,
                       args: Any) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The checkpoint's tensors under edgellm's names (`Model.sanitize`: Mixtral's and fused experts become
    `mlp.experts.N.*_proj`); an `edgellm quantize` checkpoint's projections become QuantizedTensors (kept as they
    are where GGUF has the same blocks, dequantized to float for intN/ternary formats)."""
    with torch.device("meta"):
        model = family.Model(args)
    weights: dict[str, torch.Tensor | QuantizedTensor] = dict(model.sanitize(read_weights(src)))
    fmt = quant_format(config, src)
    if fmt is None:
        return weights
    for name in projection_names(model):
        layer = model.get_submodule(name)
        keys = [f"{name}.{key}" for key in fmt.data_shapes(layer.out_features, layer.in_features)]
        if all(key in weights for key in keys):
            qt = QuantizedTensor(fmt, (layer.out_features, layer.in_features),
                                 {key.rsplit(".", 1)[1]: weights.pop(key) for key in keys})
            weights[f"{name}.weight"] = qt if fmt.name in CARRIED_FORMATS else qt.dequantize()
    return weights


def export_gguf(src: str | Path, out: str | Path, ftype: str = "f16") -> Path:
    """Write the checkpoint directory `src` as a llama.cpp GGUF file `out` with weights in `ftype`
    (f32, f16, q8_0 or q4_0; see target_type for the per-tensor rules). Projections of an `edgellm quantize`
    checkpoint in q8_0/q4_0/mxfp4 keep their blocks bit for bit whatever `ftype` says. Returns `out`."""
    src, out = Path(src), Path(out)
    if ftype not in EXPORT_TYPES:
        raise GGUFError(f"unknown GGUF export type {ftype!r}; use one of {', '.join(EXPORT_TYPES)}")
    config = read_config(src)
    family = family_for(config)
    args = family.ModelArgs.from_config(config)
    arch = GGUF_ARCH.get(args.model_type)
    if arch is None:
        raise UnsupportedModelError(f"{src}: model_type {args.model_type!r} cannot be exported to GGUF; "
                                    f"exportable: {', '.join(GGUF_ARCH)}")
    config = {**config, "num_key_value_heads": args.num_key_value_heads,
              "tie_word_embeddings": args.tie_word_embeddings}
    weights = checkpoint_weights(src, config, family, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        rope_freqs = add_hyperparameters(writer, args, src)
        if arch == "gpt-oss":
            add_gpt_oss(writer, args, src)
        elif getattr(args, "num_experts", None):
            add_experts(writer, args, arch, src)
        carried = quant_format(config, src)  # an edgellm-quantized checkpoint's blocks decide the file type
        writer.add_file_type(EXPORT_TYPES[carried.name if carried and carried.name in QUANT_TYPES else ftype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, src, args.vocab_size)
        plans = plan_tensors(weights, config, arch, ftype, src)
        if rope_freqs is not None:
            plans.append(TensorPlan(ROPE_FREQS, rope_freqs, GT.F32))
        for plan in plans:
            block, size = gguf.GGML_QUANT_SIZES[plan.qtype]
            shape = plan.shape
            nbytes = int(np.prod(shape)) * size // block
            if plan.qtype in (GT.F32, GT.F16):
                writer.add_tensor_info(plan.name, shape, np.dtype(np.float32 if plan.qtype == GT.F32 else np.float16),
                                       nbytes)
            else:
                writer.add_tensor_info(plan.name, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8),
                                       nbytes, raw_dtype=plan.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            writer.write_tensor_data(plan.array())
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()  # idempotent; on failure the partial file is removed
        tmp.unlink(missing_ok=True)
    return out

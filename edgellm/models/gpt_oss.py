"""OpenAI gpt-oss (`GptOssForCausalLM`) on the Llama skeleton: llama.py's projections, RoPE and norms, plus

- attention sinks: a learned logit per head that joins each softmax's denominator (and attends to nothing);
- per-layer attention windows: `layer_types` alternates `sliding_attention` (the last `sliding_window` tokens) and
  `full_attention`;
- q/k/v/o biases and YaRN RoPE (rope.py);
- a sparse MoE block: a router with bias, softmax over the top-k logits only, experts with biases computing the
  clamped SwiGLU `(clamp(up, ±limit) + 1) · g · σ(alpha · g)`, `g = min(gate, limit)`, gate/up columns interleaved.
- the MXFP4 release checkpoints' experts kept as mxfp4 blocks, repacked at load (`Model.mxfp4_experts`).

The KV cache protocol's `attend` has no sink term, so attention here fetches K/V from dense caches (alone or batched
by SequenceBatch) and computes the softmax with its sink column itself; other cache kinds are refused, never run
without the sinks. The fused native decode step computes none of this, so it never runs for this family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgellm.errors import CheckpointError, UnsupportedModelError
from edgellm.kernels import Linear
from edgellm.kv import AttentionCache, DenseKVCache, KVCache, KVFormat, SequenceBatch
from edgellm.models import llama
from edgellm.models.llama import RMSNorm
from edgellm.models.moe import mix_experts
from edgellm.models.offload import release_pages
from edgellm.quant.formats import mxfp4_from_packed

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class ModelArgs(llama.ModelArgs):
    """llama's hyper-parameters plus the experts' and each layer's attention kind (`layer_types`, from extra)."""

    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    split_gate_up: bool = False  # experts as separate gate_proj/up_proj (a GGUF file's layout), not gate_up_proj
    attention_bias: bool = True
    rope_theta: float = 150000.0

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        args = super().from_config(config)
        if args.num_experts_per_tok > args.num_local_experts:
            raise CheckpointError(f"config.json: num_experts_per_tok ({args.num_experts_per_tok}) exceeds the "
                                  f"{args.num_local_experts} experts")
        types = args.extra.get("layer_types")
        if types is None:  # transformers' default: sliding, full, sliding, ...
            types = [LAYER_TYPES[i % 2] for i in range(args.num_hidden_layers)]
        if not isinstance(types, list) or len(types) != args.num_hidden_layers or any(t not in LAYER_TYPES
                                                                                       for t in types):
            raise CheckpointError(f"config.json: layer_types must list {args.num_hidden_layers} entries, each one of "
                                  f"{', '.join(LAYER_TYPES)}; got {types!r}")
        if "sliding_attention" in types and args.sliding_window is None:
            raise CheckpointError("config.json: layer_types has sliding_attention layers but sliding_window is null")
        args.extra["layer_types"] = types
        return args

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.extra["layer_types"][layer] == "sliding_attention" else None


SCORES_BUDGET = 1 << 26  # fp32 scores per block of queries (256 MiB): bounds a long prompt's scratch memory


def sink_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: int, window: int | None,
                   sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax([q·Kᵀ·scale, sink])·[V, 0] for queries at positions offset.. over keys at 0.. (causal, windowed).

    q (batch, heads, t, head_dim); keys/values (batch, kv_heads, offset + t, head_dim), GQA heads sharing them.
    Scores are fp32, a block of queries at a time; a windowed layer reads only the keys some query can see.
    """
    b, h, t, _ = q.shape
    step = max(1, SCORES_BUDGET // (b * h * keys.shape[2]))
    if t <= step:
        return _sink_block(q, keys, values, offset, window, sinks, scale)
    return torch.cat([_sink_block(q[:, :, i:i + step], keys[:, :, :offset + i + step],
                                  values[:, :, :offset + i + step], offset + i, window, sinks, scale)
                      for i in range(0, t, step)], dim=2)


def _sink_block(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: int, window: int | None,
                sinks: torch.Tensor, scale: float) -> torch.Tensor:
    b, h, t, d = q.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    first = 0 if window is None else max(0, offset - window + 1)
    keys, values = keys[:, :, first:].to(q.dtype), values[:, :, first:].to(q.dtype)
    n = total - first
    grouped = q.reshape(b, kv_heads, h // kv_heads * t, d)  # head j reads kv head j // (h / kv_heads)
    scores = (grouped @ keys.transpose(-1, -2)).float().view(b, h, t, n) * scale
    q_pos = torch.arange(offset, offset + t, device=q.device).unsqueeze(1)
    k_pos = torch.arange(first, total, device=q.device).unsqueeze(0)
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= (q_pos - k_pos) >= window
    scores = scores.masked_fill(hidden, float("-inf"))
    sink = sinks.float().view(1, h, 1, 1).expand(b, h, t, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (probs.to(q.dtype).view(b, kv_heads, -1, n) @ values).view(b, h, t, d)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args)  # q/k/v/o with bias (attention_bias)
        self.sinks = nn.Parameter(torch.empty(self.n_heads))
        self.window = args.window(layer)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               cache: AttentionCache | None) -> torch.Tensor:
        """The model's causal/window mask is not used: each (cache, rows) pair is masked at its own position."""
        scale = self.head_dim**-0.5
        if cache is None:
            return sink_attention(q, k, v, 0, self.window, self.sinks, scale)
        parts = ([(c, slice(i, i + 1)) for i, c in enumerate(cache.caches)] if isinstance(cache, SequenceBatch)
                 else [(cache, slice(None))])
        out = []
        for c, rows in parts:
            if type(c) is not DenseKVCache:
                raise UnsupportedModelError(f"gpt-oss attention sinks need the dense KV cache; {type(c).__name__} "
                                            "cannot apply them (use the default or an fp32/bf16/fp16 KV format)")
            offset = c.offset
            keys, values = c.update_and_fetch(k[rows], v[rows])
            out.append(sink_attention(q[rows], keys, values, offset, self.window, self.sinks, scale))
        return out[0] if len(out) == 1 else torch.cat(out)


class Expert(nn.Module):
    """One expert: `gate_up_proj` (gate and up columns interleaved), the clamped SwiGLU, `down_proj`; all biased.

    With `split_gate_up`, gate and up are two projections instead: a GGUF file stores them as separate stacked
    tensors, and interleaving their rows into one would copy every expert out of the file mapping.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.split_gate_up:
            self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=True)
            self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=True)
        else:
            self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=True)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=True)
        self.alpha, self.limit = args.swiglu_alpha, args.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate_up = self.gate_up_proj(x)
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class MoeBlock(nn.Module):
    """`router` (Linear with bias) → top-k logits → softmax over those k → the chosen experts only."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = Linear(args.hidden_size, args.num_local_experts, bias=True)
        self.offload: Any = None  # an ExpertOffload (models/offload.py) when the experts live within a budget
        self.experts = nn.ModuleList(Expert(args) for _ in range(args.num_local_experts))

    def fuse(self) -> None:
        pass  # gate and up are one projection already, or (GGUF) two views of the file that fusing would copy

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits, weights, chosen experts) of tokens `flat` (tokens, hidden)."""
        logits = self.router(flat)
        top, index = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.softmax(top, dim=-1), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        _, weights, index = self.route(flat)
        if self.offload is not None:
            self.offload.before(self.offload_layer, flat, index)
        return mix_experts(flat, weights, index, self.experts).view(x.shape)


class DecoderLayer(llama.DecoderLayer):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        nn.Module.__init__(self)
        self.self_attn = Attention(args, layer)
        self.mlp = MoeBlock(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(llama.Model):
    """llama's causal LM with gpt-oss layers; the fused decode step covers none of them."""

    FUSED_LAYER_TYPES: frozenset = frozenset()

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))

    def make_cache(self, capacity: int, batch: int = 1, kv_format: KVFormat | None = None) -> list[KVCache]:
        caches = super().make_cache(capacity, batch, kv_format)
        if kv_format is not None and any(type(c) is not DenseKVCache for c in caches):
            raise UnsupportedModelError(f"KV format {kv_format.kind!r}: gpt-oss attention sinks need the dense KV "
                                        "cache (fp32/bf16/fp16)")
        return caches

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fused 3-D experts → per-expert Linear weights as transposed views (no copies, still memory-mapped):
        `gate_up_proj` (E, H, 2I) → `experts.N.gate_up_proj.weight` (2I, H), `down_proj` (E, I, H) → (H, I);
        `*_bias` (E, n) → `experts.N.*.bias`; MXFP4 experts → `experts.N.*.blocks` (see `mxfp4_experts`)."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.mxfp4_experts(super().sanitize(weights)).items():
            prefix, _, part = name.rpartition(".")
            if prefix.endswith(".experts") and part in ("gate_up_proj", "down_proj", "gate_up_proj_bias",
                                                        "down_proj_bias"):
                proj, key = (part[:-5], "bias") if part.endswith("_bias") else (part, "weight")
                for i, w in enumerate(tensor.unbind(0)):
                    out[f"{prefix}.{i}.{proj}.{key}"] = w if key == "bias" else w.t()
            else:
                out[name] = tensor
        return out

    def mxfp4_experts(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The release checkpoints' MXFP4 experts, `experts.{gate_up,down}_proj_blocks` uint8 (E, out, in/32, 16) +
        `_scales` uint8 (E, out, in/32), → `experts.N.{gate_up,down}_proj.blocks`, edgellm's mxfp4 rows (out,
        in/32 · 17) for QuantizedLinear. Rows are output features in the bf16 tensors' order (gate_up's interleave
        gate and up, as the experts expect). The nibble order differs, so each expert is repacked: an anonymous
        copy as large as its stored bytes (17 per 32 weights), made one expert at a time; the mapped pages read
        for it are released after each layer's projection."""
        stems = {name.rsplit("_", 1)[0] for name in weights
                 if name.endswith(("_proj_blocks", "_proj_scales")) and ".experts." in name}
        if not stems:
            return weights
        out = dict(weights)
        hidden, inner, count = self.args.hidden_size, self.args.intermediate_size, self.args.num_local_experts
        for stem in sorted(stems):
            blocks, scales = out.pop(f"{stem}_blocks", None), out.pop(f"{stem}_scales", None)
            if blocks is None or scales is None:
                raise CheckpointError(f"MXFP4 tensor {stem}_{'blocks' if blocks is None else 'scales'} is missing "
                                      f"(its _{'scales' if blocks is None else 'blocks'} is there); the checkpoint "
                                      "is incomplete")
            prefix, _, proj = stem.rpartition(".")
            rows, k = {"gate_up_proj": (2 * inner, hidden), "down_proj": (hidden, inner)}.get(proj, (0, 0))
            if not rows or k % 32:
                raise CheckpointError(f"{stem}_blocks: MXFP4 experts are gate_up_proj and down_proj with inputs in "
                                      f"whole blocks of 32; config.json has hidden_size {hidden}, intermediate_size "
                                      f"{inner}")
            want = (count, rows, k // 32)
            if (blocks.dtype, scales.dtype) != (torch.uint8, torch.uint8) or tuple(blocks.shape) != (*want, 16) \
                    or tuple(scales.shape) != want:
                raise CheckpointError(f"MXFP4 tensors {stem}_blocks {tuple(blocks.shape)} {blocks.dtype} and _scales "
                                      f"{tuple(scales.shape)} {scales.dtype}: config.json implies uint8 "
                                      f"{(*want, 16)} and {want}")
            for i in range(count):
                out[f"{prefix}.{i}.{proj}.blocks"] = mxfp4_from_packed(blocks[i], scales[i])
            release_pages(blocks)
            release_pages(scales)
        return out

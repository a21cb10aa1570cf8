"""Sparse Mixture-of-Experts families on the Llama skeleton: Mixtral, Qwen2-MoE (shared expert behind a sigmoid
gate, dense layers by `decoder_sparse_step`/`mlp_only_layers`), Qwen3-MoE (q/k RMSNorm) and OLMoE (q/k RMSNorm over
the whole projection, optional q/k/v clipping).

Attention, RoPE, norms and the KV cache path are llama.py's; only the feed-forward block differs. Experts are
per-expert modules named as HF checkpoints store them, so loading stays a dict assignment (mmap'd, nothing stacked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from edgellm.errors import CheckpointError
from edgellm.kernels import Linear
from edgellm.models import llama
from edgellm.models.llama import MLP, RMSNorm
from edgellm.models.rope import apply_rope

MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass
class ModelArgs(llama.ModelArgs):
    """llama's hyper-parameters plus the router's; Mixtral names the expert count `num_local_experts`."""

    num_experts: int | None = None
    num_local_experts: int | None = None
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    qkv_bias: bool = True
    clip_qkv: float | None = None
    moe_routing: str = "topk"  # edgellm-trained models only: "moge" routes top-k/groups inside each expert group
    moe_groups: int = 1

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        if config.get("model_type") in ("qwen2_moe", "qwen3_moe") and not config.get("use_sliding_window", False):
            config = {**config, "sliding_window": None}  # Qwen saves 0 here when the window is off
        args = super().from_config(config)
        args.num_experts = args.num_experts or args.num_local_experts
        if args.num_experts is None:
            raise CheckpointError("config.json has neither 'num_experts' nor 'num_local_experts'; add the expert count")
        if args.num_experts_per_tok > args.num_experts:
            raise CheckpointError(f"config.json: num_experts_per_tok ({args.num_experts_per_tok}) exceeds the "
                                  f"{args.num_experts} experts")
        dense = args.extra.get("mlp_only_layers", [])
        if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
            raise CheckpointError(f"config.json: mlp_only_layers must be a list of layer indices, got {dense!r}")
        if args.model_type == "qwen2_moe":
            args.attention_bias = args.qkv_bias
        if args.moe_routing not in ("topk", "moge"):
            raise CheckpointError(f"config.json: moe_routing {args.moe_routing!r} is not one of topk, moge")
        if args.moe_routing == "moge" and (args.moe_groups < 1 or args.num_experts % args.moe_groups
                                           or args.num_experts_per_tok % args.moe_groups):
            raise CheckpointError(f"config.json: MoGE needs moe_groups ({args.moe_groups}) dividing both the "
                                  f"{args.num_experts} experts and num_experts_per_tok ({args.num_experts_per_tok})")
        return args

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3_moe"

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def is_sparse(self, layer: int) -> bool:
        """Qwen2/3-MoE may keep some layers dense; Mixtral and OLMoE configs omit both keys, so every layer is MoE."""
        return (layer not in self.extra.get("mlp_only_layers", [])) and (layer + 1) % self.decoder_sparse_step == 0


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then the top k (weights, indices), as transformers routes."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


def grouped_topk(logits: torch.Tensor, groups: int, k_per_group: int,
                 scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoGE routing (Pangu Pro MoE): softmax over all experts, then the top `k_per_group` inside each of `groups`
    contiguous expert groups, so every group (one device each) gets the same load by construction.

    Weights are score × per-expert `scale`, not renormalised. Returns (weights, indices), each (tokens,
    groups × k_per_group), group by group.
    """
    n, e = logits.shape
    if e % groups:
        raise ValueError(f"{e} experts do not split into {groups} equal groups")
    probs = torch.softmax(logits.float(), dim=-1)
    top, local = torch.topk(probs.view(n, groups, e // groups), k_per_group, dim=-1)
    index = (local + torch.arange(groups, device=logits.device).unsqueeze(1) * (e // groups)).reshape(n, -1)
    weights = top.reshape(n, -1)
    return (weights * scale.float()[index] if scale is not None else weights), index


def imbalance(index: torch.Tensor, num_experts: int) -> float:
    """(max load − min load) / tokens over the experts of one routing decision: 0 is perfectly balanced."""
    load = torch.bincount(index.flatten(), minlength=num_experts)
    return (load.max() - load.min()).item() / max(index.shape[0], 1)


def mix_experts(x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Σ weight · expert(x) per token over its chosen experts, running only the experts some token chose.

    Assignments are sorted by expert and each chosen expert runs once on all of its tokens: decode reads just the
    k chosen experts' weights, prefill does one matmul per expert hit, and nothing computes all experts densely.
    """
    k = index.shape[1]
    flat = index.flatten()
    order = flat.argsort(stable=True)
    rows, weights = order // k, weights.flatten()[order].to(x.dtype).unsqueeze(1)
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(torch.bincount(flat, minlength=len(experts)).tolist()):
        if count:
            hit = rows[start:start + count]
            out.index_add_(0, hit, experts[expert](x[hit]) * weights[start:start + count])
            start += count
    return out


def load_balancing_loss(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss on the global softmax: E · Σ_e (share of assignments to e) · (mean
    router probability of e); 1 when balanced. Trains a router toward even load (MoGE is even by construction
    per group; the loss still spreads tokens inside each group)."""
    num = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    share = torch.bincount(index.flatten(), minlength=num).float() / index.numel()
    return num * (share * probs.mean(0)).sum()


class SparseMoeBlock(nn.Module):
    """Router (`gate`) + experts, and Qwen2-MoE's always-on shared expert scaled by a sigmoid gate.

    Routing is softmax-then-top-k, or for an edgellm-trained MoGE model `grouped_topk` with a learned per-expert
    scale (`expert_scale`). While training, the last call's router logits and choices are kept for the
    load-balancing loss."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.renormalize = args.num_experts_per_tok, args.norm_topk_prob or args.model_type == "mixtral"
        self.routing, self.groups = args.moe_routing, args.moe_groups
        if self.routing == "moge":  # E/K at init: K of E softmax probabilities sum to ~K/E, so the mix starts at ~1
            self.expert_scale = nn.Parameter(torch.full((args.num_experts,), args.num_experts / self.top_k))
        self.routed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)
        self.offload: Any = None  # an ExpertOffload (models/offload.py) when the experts live within a budget
        self.experts = nn.ModuleList(MLP(replace(args, intermediate_size=args.expert_size))
                                     for _ in range(args.num_experts))
        if args.shared_expert_intermediate_size:
            self.shared_expert = MLP(replace(args, intermediate_size=args.shared_expert_intermediate_size))
            self.shared_expert_gate = Linear(args.hidden_size, 1, bias=False)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits, weights, chosen experts) of tokens `flat` (tokens, hidden)."""
        logits = self.gate(flat)
        if self.routing == "moge":
            return logits, *grouped_topk(logits, self.groups, self.top_k // self.groups, self.expert_scale)
        return logits, *topk_softmax(logits, self.top_k, self.renormalize)

    def fuse(self) -> None:
        """The shared expert only: fusing every expert's gate/up would copy them all out of the file mapping (RAM
        as large again, and no expert offload), for a gain only op-at-a-time decode sees."""
        if hasattr(self, "shared_expert"):
            self.shared_expert.fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fused decode step (fused.py, kernels/csrc/step.cpp) computes the same: change both together
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, index = self.route(flat)
        if self.training:
            self.routed = (logits, index)
        if self.offload is not None:
            self.offload.before(self.offload_layer, flat, index)
        out = mix_experts(flat, weights, index, self.experts)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(x.shape)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        if args.model_type == "qwen2_moe":  # q/k/v carry a bias, the output projection does not
            self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)


class OlmoeAttention(llama.Attention):
    """OLMoE normalises q and k over the whole projection (all heads at once, before the head split), then clips."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.q_norm = RMSNorm(self.n_heads * self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.n_kv_heads * self.head_dim, args.rms_norm_eps)
        self.clip = args.clip_qkv

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip is None else x.clamp(-self.clip, self.clip)

    def place_kv(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = k.shape
        k = self.clamp(self.k_norm(k)).view(b, t, self.n_kv_heads, self.head_dim)
        return (apply_rope(k.transpose(1, 2), cos, sin),
                self.clamp(v).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2))

    def place_q(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = q.shape
        q = self.clamp(self.q_norm(q)).view(b, t, self.n_heads, self.head_dim)
        return apply_rope(q.transpose(1, 2), cos, sin)


class DecoderLayer(llama.DecoderLayer):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        nn.Module.__init__(self)
        self.self_attn = (OlmoeAttention if args.model_type == "olmoe" else Attention)(args)
        self.mlp = SparseMoeBlock(args) if args.is_sparse(layer) else MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(llama.Model):
    """llama's causal LM with MoE decoder layers: the forward pass, caches and RoPE are llama's unchanged."""

    # what the fused native decode step computes (fused.py mirrors SparseMoeBlock.forward and OlmoeAttention)
    FUSED_LAYER_TYPES = frozenset((DecoderLayer, attn, mlp) for attn in (Attention, OlmoeAttention)
                                  for mlp in (MLP, SparseMoeBlock))

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mixtral's `block_sparse_moe.experts.N.w1/w3/w2` → `mlp.experts.N.gate/up/down_proj`, and fused 3-D
        experts (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)) → per-expert views, no copies."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in super().sanitize(weights).items():
            name = name.replace(".block_sparse_moe.", ".mlp.")
            name = re.sub(r"(\.experts\.\d+\.)(w[123])\.", lambda m: f"{m[1]}{MIXTRAL_EXPERT[m[2]]}.", name)
            prefix, _, part = name.rpartition(".")
            if prefix.endswith(".experts") and part in ("gate_up_proj", "down_proj"):
                for i, w in enumerate(tensor.unbind(0)):
                    if part == "down_proj":
                        out[f"{prefix}.{i}.down_proj.weight"] = w
                    else:
                        out[f"{prefix}.{i}.gate_proj.weight"], out[f"{prefix}.{i}.up_proj.weight"] = w.chunk(2, 0)
            else:
                out[name] = tensor
        return out

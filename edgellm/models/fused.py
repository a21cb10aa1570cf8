"""The fused native decode step for the Llama family: one native call runs every layer of one token.

The PyTorch modules stay the reference and the fallback: the step is used only where it computes the same thing
(one sequence, one token, dense fp32/bf16/fp16 K/V caches, no mask, no K/V tap, no autograd, weights it reads as
stored), and a model whose modules were swapped since the plan was made gets a new plan.
EDGELLM_FUSED_STEP=0 turns it off (for A/B benchmarks and per-op timing).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from edgellm.kernels.native import load_extension
from edgellm.kv import DenseKVCache

# Weight formats the step reads as stored (the LUT formats, intN and ternary, run op at a time)
BLOCK_KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "mxfp4", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def enabled() -> bool:
    return os.environ.get("EDGELLM_FUSED_STEP", "1") != "0"


def _weight(module: nn.Module) -> tuple[str, torch.Tensor] | None:
    """(kind, tensor as stored) for a projection the step can read, else None."""
    if isinstance(module, nn.Linear):
        kind = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(module.weight.dtype)
        return None if kind is None else (kind, module.weight.detach())
    fmt = getattr(module, "fmt", None)
    if fmt is not None and fmt.kind in BLOCK_KINDS and hasattr(module, "blocks"):
        return fmt.kind, module.blocks
    return None


class FusedStep:
    """A native plan over one model's weights, with the tensors it was made from, to notice a swap."""

    def __init__(self, plan: Any, refs: list[tuple[nn.Module, str, Any]]) -> None:
        self.plan, self.refs = plan, refs

    def current(self) -> bool:
        return all(getattr(module, name) is value for module, name, value in self.refs)


def build(model: Any) -> FusedStep | None:
    """The plan for a Llama-family `model` (llama.Model, which hands over its layer types: this module is below it),
    or None where the step does not cover it (a layer type, a weight format)."""
    ext = load_extension("step")
    args = model.args
    if ext is None or model.model.embed_tokens.weight.device.type != "cpu":
        return None
    plan = ext.Plan(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                    args.rms_norm_eps, model.model.norm.weight.detach(), args.vocab_size)
    refs: list[tuple[nn.Module, str, Any]] = []
    for layer in model.model.layers:
        if (type(layer), type(layer.self_attn), type(layer.mlp)) != model.FUSED_LAYER_TYPES:
            return None  # another family's layer (MoE, OLMoE's norms) computes something else
        projs = []
        for part, name in PROJECTIONS:
            parent = getattr(layer, part)
            module = getattr(parent, name)
            weight = _weight(module)
            if weight is None:
                return None
            bias = getattr(module, "bias", None)
            projs.append((weight[0], weight[1], None if bias is None else bias.detach(), module.out_features,
                          module.in_features))
            refs += [(parent, name, module), (module, "weight" if weight[0] in ("f32", "bf16") else "blocks",
                                              getattr(module, "weight" if weight[0] in ("f32", "bf16") else "blocks"))]
        attn = layer.self_attn
        q_norm, k_norm = (attn.q_norm.weight.detach(), attn.k_norm.weight.detach()) if args.qk_norm else (None, None)
        plan.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                       q_norm, k_norm, projs)
        refs += [(layer.input_layernorm, "weight", layer.input_layernorm.weight),
                 (layer.post_attention_layernorm, "weight", layer.post_attention_layernorm.weight)]
    head = _weight(model.lm_head)
    if head is None or getattr(model.lm_head, "bias", None) is not None:
        return None
    plan.set_head(head[0], head[1], args.vocab_size, args.hidden_size)
    refs += [(model, "lm_head", model.lm_head), (model.model.norm, "weight", model.model.norm.weight),
             (model.model.embed_tokens, "weight", model.model.embed_tokens.weight)]
    return FusedStep(plan, refs)


def decode_step(model: Any, tokens: torch.Tensor, cache: list) -> torch.Tensor | None:
    """Logits (1, 1, vocab) for one token of one sequence through the fused step, or None to run op at a time."""
    if (tokens.shape != (1, 1) or torch.is_grad_enabled() or not enabled()
            or not all(type(c) is DenseKVCache and c.keys.shape[0] == 1 for c in cache)):
        return None
    pos = cache[0].offset
    window = model.args.sliding_window
    if (window is not None and pos + 1 > window) or any(c.offset != pos for c in cache):
        return None
    fused = model.__dict__.get("_fused")
    if fused is None or (fused is not False and not fused.current()):
        fused = build(model) or False
        model.__dict__["_fused"] = fused
    if fused is False:
        return None
    for c in cache:
        if pos + 1 > c.capacity:
            c._grow(pos + 1)
    h = model.model.embed_tokens(tokens).reshape(-1).float()
    cos, sin = model.rope.cos_sin(torch.tensor([[pos]]), torch.float32)
    logits = fused.plan.forward(h, cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous(),
                                [c.keys for c in cache], [c.values for c in cache], pos)
    for c in cache:
        c.offset = pos + 1
    return logits.to(model.model.embed_tokens.weight.dtype).view(1, 1, -1)

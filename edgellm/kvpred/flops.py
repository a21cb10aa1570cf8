"""Analytic FLOPs of time to first token: 2 per weight per token for the linear layers, plus attention.

Attention at a context of c tokens costs 4·c·(heads·head_dim) per layer per token (scores and weighted sum),
summed causally over a prefill. Embedding lookups and norms are left out (no multiply-adds worth counting).
"""

from __future__ import annotations

from edgellm.models.llama import ModelArgs


def layer_weights(args: ModelArgs) -> int:
    """Weights one token multiplies through in one decoder layer: q/k/v/o and the gated MLP."""
    h, q_dim = args.hidden_size, args.num_attention_heads * args.head_dim
    kv = args.num_key_value_heads * args.head_dim
    return h * q_dim + 2 * h * kv + q_dim * h + 3 * h * args.intermediate_size


def forward_flops(args: ModelArgs, tokens: int, start: int = 0, layers: int | None = None,
                  logits_tokens: int = 1) -> float:
    """FLOPs of running `tokens` new tokens after `start` cached ones through `layers` layers (all by default),
    with the lm_head applied to `logits_tokens` of them."""
    layers = args.num_hidden_layers if layers is None else layers
    q_dim = args.num_attention_heads * args.head_dim
    contexts = tokens * start + tokens * (tokens + 1) / 2  # Σ over new tokens of the context each attends to
    per_layer = 2 * layer_weights(args) * tokens + 4 * q_dim * contexts
    return layers * per_layer + 2 * args.hidden_size * args.vocab_size * logits_tokens


def base_ttft_flops(base: ModelArgs, prompt: int) -> float:
    """The plain prefill: every prompt token through every base layer, logits for the last one."""
    return forward_flops(base, prompt)


def kvpred_ttft_flops(base: ModelArgs, aux: ModelArgs, prompt: int) -> float:
    """Aux over prompt-1 tokens (no logits) + the K and V maps for every base layer + one base step at the end."""
    n = prompt - 1
    aux_kv = aux.num_key_value_heads * aux.head_dim
    base_kv = base.num_key_value_heads * base.head_dim
    maps = 2 * 2 * aux_kv * base_kv * base.num_hidden_layers * n
    return forward_flops(aux, n, logits_tokens=0) + maps + forward_flops(base, 1, start=n)

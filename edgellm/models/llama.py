"""The Llama family: Llama 2/3.x, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm), SmolLM, TinyLlama.

Module names equal the checkpoint's tensor names, so loading is a plain state-dict assignment.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from functools import partial
from typing import get_args, get_type_hints

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.errors import CheckpointError
from edgellm.kernels import Linear, fuse_linears, linear
from edgellm.kernels.decode import rms_norm
from edgellm.kv import AttentionCache, DenseKVCache, KVCache, KVFormat, causal_mask, make_caches
from edgellm.models import fused
from edgellm.models.lora import add_lora
from edgellm.models.rope import RotaryEmbedding, apply_rope

# Called per layer as tap(layer, k, v) with the pre-norm, pre-RoPE K/V (batch, seq, kv_heads*head_dim); returns
# the K/V the layer goes on with: the same ones to observe them, others to replace them (KV Prediction).
KVTap = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ModelArgs:
    """Hyper-parameters read straight from config.json."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        cls.check_config(config)
        names = {f.name for f in fields(cls)} - {"extra"}
        args = cls(**{k: v for k, v in config.items() if k in names},
                   extra={k: v for k, v in config.items() if k not in names})
        if args.num_key_value_heads is None:
            args.num_key_value_heads = args.num_attention_heads
        if args.head_dim is None:
            args.head_dim = args.hidden_size // args.num_attention_heads
        if args.model_type == "qwen2":
            args.attention_bias = True  # Qwen2 always has q/k/v bias; its config does not say so
        if args.model_type in ("qwen2", "qwen3") and not args.use_sliding_window:
            args.sliding_window = None
        if args.rope_scaling is None and isinstance(config.get("rope_parameters"), dict):
            params = config["rope_parameters"]
            args.rope_theta = params.get("rope_theta", args.rope_theta)
            if params.get("rope_type", "default") != "default":
                args.rope_scaling = params
        return args

    @classmethod
    def check_config(cls, config: dict) -> None:
        """config.json is hand-edited: a missing key or a wrong value type must fail here, naming the key, rather
        than as a TypeError deep in torch. Every number here is a size, a count, an epsilon or a base: > 0."""
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name == "extra":
                continue
            if f.name not in config:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise CheckpointError(f"config.json has no {f.name!r}; add it (see the model's original config)")
                continue
            value, kinds = config[f.name], get_args(hints[f.name]) or (hints[f.name],)
            if value is None and type(None) in kinds:
                continue
            kind = kinds[0]
            if kind in (int, float):  # `< inf` also refuses nan, and unlike isfinite() takes ints of any size
                ok = (isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
                      and 0 < value < math.inf)
            else:
                ok = isinstance(value, kind)
            if not ok:
                want = {int: "a positive integer", float: "a positive number", bool: "true or false", str: "a string",
                        dict: "a JSON object"}[kind] + (" or null" if type(None) in kinds else "")
                raise CheckpointError(f"config.json: {f.name} must be {want}, got {value!r}; fix the value in "
                                      "config.json")

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"


class RMSNorm(nn.Module):
    """RMS norm computed in fp32 and cast back, as transformers does (needed for exact parity)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # a native loop for a few fp32/bf16 rows, else fused torch ops


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias and args.model_type != "qwen2")
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        if all(isinstance(p, nn.Linear) for p in (self.q_proj, self.k_proj, self.v_proj)):  # quantized run apart
            self.qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def place_kv(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-RoPE K/V (batch, seq, kv_heads*head_dim) → the cached layout, with the key norm and RoPE applied."""
        b, t, _ = k.shape
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        if hasattr(self, "k_norm"):
            k = self.k_norm(k)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        return k, v.reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def place_q(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries (batch, seq, heads*head_dim) → (batch, heads, seq, head_dim), with the query norm and RoPE."""
        b, t, _ = q.shape
        q = q.view(b, t, self.n_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q = self.q_norm(q)
        return apply_rope(q.transpose(1, 2), cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: AttentionCache | None, kv_tap: Callable | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv is not None:
            kv_dim = self.n_kv_heads * self.head_dim
            qkv = linear(x, *self.qkv)
            add_lora(qkv, x, (self.q_proj, self.k_proj, self.v_proj))
            q, k, v = qkv.split([self.n_heads * self.head_dim, kv_dim, kv_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if kv_tap is not None:
            k, v = kv_tap(k, v)
        out = self.attend(self.place_q(q, cos, sin), *self.place_kv(k, v, cos, sin), mask, cache)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               cache: AttentionCache | None) -> torch.Tensor:
        """Attention of q (batch, heads, seq, head_dim) over the cache and the new k/v (batch, kv_heads, ...)."""
        if cache is not None:  # the cache stores K/V and attends, whatever its kind (dense, quantized, batched)
            return cache.attend(q, k, v, mask, self.head_dim**-0.5)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=self.n_heads != self.n_kv_heads)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def fuse(self) -> None:
        if isinstance(self.gate_proj, nn.Linear) and isinstance(self.up_proj, nn.Linear):
            self.gate_up = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate_up = linear(x, *self.gate_up)
            add_lora(gate_up, x, (self.gate_proj, self.up_proj))
            gate, up = gate_up.chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: AttentionCache | None, kv_tap: Callable | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, kv_tap)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # Uninitialised: a checkpoint or the trainer fills it. nn.Embedding's own normal_ init on the meta device
        # imports torch._dynamo, ~2 s of every model load.
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(nn.Module):
    """Causal LM: `forward(tokens, cache)` → logits; `make_cache()` says which cache this model uses."""

    FUSED_LAYER_TYPES = frozenset({(DecoderLayer, Attention, MLP)})  # the layers the fused decode step computes

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.max_position_embeddings, args.rope_scaling)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the embedding table's, or what a table kept quantized dequantizes its rows to."""
        embed = self.model.embed_tokens
        return embed.weight.dtype if isinstance(embed, nn.Embedding) else embed.dtype

    @property
    def device(self) -> torch.device:
        embed = self.model.embed_tokens
        return embed.weight.device if isinstance(embed, nn.Embedding) else embed.device

    def fuse(self) -> None:
        """Fuse q/k/v and gate/up projections for bf16 inference (loading does this where it converts the weights
        anyway, not over a memory-mapped bf16 checkpoint it would copy; training keeps them apart).

        Measured here: one fused bf16 GEMV through the native kernel beats separate ones (178 vs 251 µs for
        two 1536×384 projections), while torch's fp32 GEMV gets slower on the fused shape (422 vs 340 µs), and
        fp32 weights stay memory-mapped only when left alone.
        """
        if self.dtype != torch.bfloat16:
            return
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def tie_weights(self) -> None:
        """A tied head reads the embedding's table: its float weight, or the blocks of a table kept quantized."""
        if not self.args.tie_word_embeddings or not isinstance(self.lm_head, nn.Linear):  # a quantized copy stays
            return
        embed = self.model.embed_tokens
        if isinstance(embed, nn.Embedding):
            self.lm_head.weight = embed.weight
        else:
            self.lm_head = embed.tied_head()

    def make_cache(self, capacity: int, batch: int = 1, kv_format: KVFormat | None = None) -> list[KVCache]:
        """One preallocated cache per layer, reserved for `capacity` tokens: dense in the model's dtype by default."""
        if kv_format is not None:
            return make_caches(self, kv_format, capacity, batch)
        dtype, device = self.dtype, self.device
        return [DenseKVCache(batch, self.args.num_key_value_heads, self.args.head_dim, capacity, dtype, device)
                for _ in range(self.args.num_hidden_layers)]

    def forward(self, tokens: torch.Tensor, cache: list[AttentionCache] | None = None, last_only: bool = False,
                kv_tap: KVTap | None = None, num_layers: int | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for `tokens` (batch, seq); with `last_only`, only the last position's.

        `kv_tap` sees (and may replace) every layer's pre-RoPE K/V; with `num_layers`, only the first that many
        layers run and the hidden state is returned instead of logits (all the K/V a predictor needs).
        """
        b, t = tokens.shape
        if t == 1 and cache and kv_tap is None and num_layers is None:
            logits = fused.decode_step(self, tokens, cache)
            if logits is not None:
                return logits
        elif t <= fused.MANY_MAX and cache and kv_tap is None and num_layers is None:
            logits = fused.multi_step(self, tokens, cache)
            if logits is not None:
                return logits[:, -1:] if last_only else logits
        h = self.model.embed_tokens(tokens)
        offsets = cache[0].offsets if cache else [0]
        positions = torch.tensor(offsets, device=tokens.device).unsqueeze(1) + torch.arange(t, device=tokens.device)
        # one position for every row: one mask for all layers; rows at their own positions mask themselves
        mask = causal_mask(offsets[0], t, self.args.sliding_window, tokens.device) if len(offsets) == 1 else None
        if len(offsets) == 1:
            positions = positions.expand(b, t)
        cos, sin = self.rope.cos_sin(positions, h.dtype)
        for i, layer in enumerate(self.model.layers[:num_layers]):
            h = layer(h, cos, sin, mask, cache[i] if cache else None, partial(kv_tap, i) if kv_tap else None)
        if num_layers is not None:
            return h
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h))

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop tensors HF saves but the model recomputes (rotary tables) and a tied lm_head."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

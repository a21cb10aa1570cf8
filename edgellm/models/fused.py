"""The fused native decode step for the Llama family: one native call runs every layer of one token.

Layers are dense or sparse MoE (models/moe.py's SparseMoeBlock: router, softmax top-k or MoGE's grouped top-k, the
chosen experts, Qwen2-MoE's gated shared expert), with Qwen3's per-head or OLMoE's whole-projection q/k norms and
OLMoE's q/k/v clip.

The K/V caches are dense (fp32/bf16/fp16) or quantized (QuantizedKVCache: 8/4/2-bit codes, per-token or KIVI
per-channel keys, Hadamard-rotated or not, with or without a full-precision window): the new token is quantized on
store bit-exactly as the cache's own store does, and attention runs over the packed codes and the window as the
kvattn kernel computes it. A step that closes a KIVI key group (one in `group`) runs op at a time.
They are contiguous, or paged (PagedKVCache: every layer's blocks in one BlockPool, dense or per-token quantized
without a window): the step takes the blocks the token needs first, as the cache's own store does (a fresh block, a
copy of a shared tail block), then reads and writes the pool's fields in place through each layer's page table.

The PyTorch modules stay the reference and the fallback: the step is used only where it computes the same thing
(one sequence, one token, one cache format and position in every layer, no mask, no K/V tap, no autograd, weights
it reads as stored; not batched caches), and a model whose modules were swapped since the plan was made
gets a new plan.
EDGELLM_FUSED_STEP=0 turns it off (for A/B benchmarks and per-op timing).
"""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
from torch import nn

from edgellm.kernels.native import load_extension
from edgellm.kv import DenseKVCache, PagedKVCache, QuantizedKVCache
from edgellm.models.lora import LoraLinear

# Weight formats the step reads as stored; the others with a table-lookup copy (intN, ternary) through that copy
BLOCK_KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "mxfp4", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MANY_MAX = 16  # tokens up to which multi_step runs (a speculative check of up to 15 drafts); past it, GEMMs win


def enabled() -> bool:
    return os.environ.get("EDGELLM_FUSED_STEP", "1") != "0"


def _weight(module: nn.Module) -> tuple[str, Any] | None:
    """(kind, what the step reads) for a projection it can read, else None: a tensor as stored, or for "lut" the
    table-lookup kernel's LutWeight (made at load for the intN and ternary formats)."""
    if isinstance(module, nn.Linear):
        kind = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(module.weight.dtype)
        return None if kind is None else (kind, module.weight.detach())
    fmt = getattr(module, "fmt", None)
    if fmt is not None and fmt.kind in BLOCK_KINDS and hasattr(module, "blocks"):
        return fmt.kind, module.blocks
    if getattr(module, "lut", None) is not None:
        return "lut", module.lut
    return None


class NotCovered(Exception):
    """A projection in a format the step does not read: the model runs op at a time."""


class _Watched(dict):
    """A module's _parameters / _buffers / _modules dict that counts edits to it, so a plan notices a swapped weight
    in one comparison rather than thousands of lookups per step (an MoE reads every expert's projections, and those
    lookups missed the caches the weights had just streamed through: ~1 ms per token of a 1.3B MoE). nn.Module's own
    API (setattr, register_*, del, load_state_dict(assign=True), .to()) edits these dicts through these methods."""

    __slots__ = ()
    edits = 0  # one count for every watched dict

    def __setitem__(self, key: str, value: Any) -> None:
        _Watched.edits += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        _Watched.edits += 1
        super().__delitem__(key)



def _counted(method: Any) -> Any:
    def edit(self: _Watched, *args: Any, **kwargs: Any) -> Any:
        _Watched.edits += 1
        return method(self, *args, **kwargs)
    return edit


for _method in (dict.pop, dict.popitem, dict.clear, dict.update, dict.setdefault, dict.__ior__):
    setattr(_Watched, _method.__name__, _counted(_method))


def _slots(module: nn.Module, name: str) -> dict[str, Any]:
    """The dict that holds `module.name`, made a _Watched one; the module's __dict__ for a plain attribute."""
    for attr in ("_parameters", "_buffers", "_modules"):
        d = module.__dict__[attr]
        if name in d:
            if type(d) is not _Watched:
                d = module.__dict__[attr] = _Watched(d)
            return d
    return module.__dict__


class FusedStep:
    """A native plan over one model's weights, with the tensors it was made from, to notice a swap.

    An MoE model has thousands of them (every expert's projections), checked before every step: a weight in one of
    nn.Module's dicts through the count of edits to watched dicts (any edit since the plan was made rebuilds it),
    one held as a plain attribute by a lookup in the module's __dict__."""

    def __init__(self, plan: Any, refs: list[tuple[nn.Module, str, Any]], settle: Any = None,
                 loras: list[LoraLinear] | None = None) -> None:
        self.plan = plan
        # the plain attributes' holding dicts, names and the values the plan read (columns: see `current`)
        plain = [(d, name, value) for module, name, value in refs if type(d := _slots(module, name)) is not _Watched]
        self.dicts = [d for d, _, _ in plain]
        self.names = [name for _, name, _ in plain]
        self.values = [value for _, _, value in plain]
        self.edits = _Watched.edits  # after _slots watched every dict
        self.settle = settle  # called after each step: an expert budget's deferred re-pin
        self.loras = loras or []  # projections with adapters, in the plan's set_lora order
        self.adapter: str | None = None  # the adapter the plan applies now

    def current(self) -> bool:
        return self.edits == _Watched.edits and all(
            map(operator.is_, map(dict.get, self.dicts, self.names), self.values))

    def select(self, adapter: str | None) -> None:
        """Make the plan apply `adapter` (None: the base alone) from the next step on."""
        if adapter != self.adapter:
            slots = [m.slots.get(adapter, -1) for m in self.loras]
            scales = [m.lora[adapter][2] if slot >= 0 else 0.0 for m, slot in zip(self.loras, slots, strict=True)]
            self.plan.select_lora(slots, scales)
            self.adapter = adapter


class _Reader:
    """Hands projections to the plan as (kind, weight, bias, N, K) and records what it read in `refs`."""

    def __init__(self) -> None:
        self.refs: list[tuple[nn.Module, str, Any]] = []
        self.loras: list[tuple[LoraLinear, Any]] = []  # with the tensor the plan reads as each one's base weight

    def proj(self, parent: nn.Module, name: str) -> tuple:
        module = getattr(parent, name)
        lora = None
        if isinstance(module, LoraLinear):  # the base, plus the adapters' side path (set_lora after the layers)
            self.refs += [(parent, name, module), (module, "lora_a", module.lora_a),
                          (module, "lora_bt", module.lora_bt)]
            lora, parent, name, module = module, module, "base", module.base
        weight = _weight(module)
        if weight is None:
            raise NotCovered(name)
        if lora is not None:
            self.loras.append((lora, weight[1].packed if weight[0] == "lut" else weight[1]))
        attr = {"f32": "weight", "bf16": "weight", "lut": "lut"}.get(weight[0], "blocks")
        self.refs += [(parent, name, module), (module, attr, getattr(module, attr))]
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach()
        if weight[0] == "lut":
            lut = weight[1]
            return "lut", lut.packed, bias, module.out_features, module.in_features, lut.scale, lut.bias, lut.bits, \
                lut.group
        return weight[0], weight[1], bias, module.out_features, module.in_features

    def vector(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        """A 1-D parameter the plan reads as is (a norm's weight, MoGE's expert scale), watched for swaps."""
        self.refs.append((module, name, getattr(module, name)))
        return getattr(module, name).detach()


def _add_layer(plan: Any, layer: nn.Module, read: _Reader) -> None:
    """One decoder layer into the plan: its attention, then its dense or sparse MoE feed-forward block."""
    attn, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = ((read.vector(attn.q_norm), read.vector(attn.k_norm)) if hasattr(attn, "q_norm")
                      else (None, None))  # per head (Qwen3) or over the projection (OLMoE): the widths tell
    plan.add_layer(read.vector(layer.input_layernorm), read.vector(layer.post_attention_layernorm), q_norm, k_norm,
                   getattr(attn, "clip", None), [read.proj(attn, name) for name in ATTENTION])
    if not hasattr(mlp, "experts"):
        plan.set_mlp([read.proj(mlp, name) for name in MLP])
        return
    shared = hasattr(mlp, "shared_expert")
    plan.set_moe(read.proj(mlp, "gate"), [[read.proj(e, name) for name in MLP] for e in mlp.experts], mlp.top_k,
                 mlp.renormalize, [read.proj(mlp.shared_expert, name) for name in MLP] if shared else [],
                 read.proj(mlp, "shared_expert_gate") if shared else None)
    if mlp.routing == "moge":
        plan.set_moe_groups(mlp.groups, read.vector(mlp, "expert_scale"))


def build(model: Any) -> FusedStep | None:
    """The plan for a Llama-family `model` (llama.Model or a subclass, which hands over the layer types the step
    computes: this module is below it), or None where the step does not cover it (a layer type, a weight format)."""
    ext = load_extension("step")
    args = model.args
    if ext is None or model.device.type != "cpu":
        return None
    if any((type(layer), type(layer.self_attn), type(layer.mlp)) not in model.FUSED_LAYER_TYPES
           for layer in model.model.layers):
        return None  # another family's layer computes something else
    plan = ext.Plan(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                    args.rms_norm_eps, model.model.norm.weight.detach(), args.vocab_size)
    read = _Reader()
    try:
        for layer in model.model.layers:
            _add_layer(plan, layer, read)
    except NotCovered:
        return None
    head = _weight(model.lm_head)
    if head is None or head[0] == "lut" or getattr(model.lm_head, "bias", None) is not None:
        return None
    plan.set_head(head[0], head[1], args.vocab_size, args.hidden_size)
    layers = model.model.layers
    store = next((layer.mlp.offload for layer in layers if getattr(layer.mlp, "offload", None) is not None), None)
    if store is not None:
        # experts within a budget (models/offload.py): the policy sees each layer's routing before its experts run
        plan.set_hook(lambda li, x, chosen: store.before(layers[li].mlp.offload_layer, x, chosen, in_step=True))
    read.refs += [(model, "lm_head", model.lm_head), (model.model.norm, "weight", model.model.norm.weight),
                  (model.model, "embed_tokens", model.model.embed_tokens)]
    try:
        for lora, weight in read.loras:
            plan.set_lora(weight, lora.lora_a, lora.lora_bt, lora.rank)
    except RuntimeError:  # an adapter on a projection the step reads elsewhere (a MoE router)
        return None
    return FusedStep(plan, read.refs, None if store is None else store.settle, [lora for lora, _ in read.loras])


def _packed(cache: list) -> tuple[tuple, int] | None:
    """forward_packed's arguments after `pos` (quantized, held, bits, key group, value group, per-channel, Hadamard)
    and the tokens quantized after the step, where it can store this token in these QuantizedKVCaches, else None.
    The codes grow first if the token (or the window's oldest, which it pushes out) goes into them."""
    first = cache[0]
    fmt = (first.bits, first.group, first.scheme, first.window, first.hadamard, first.dtype, first.offset,
           first.quantized, first.recent_keys.shape)
    if not all(type(c) is QuantizedKVCache and (c.bits, c.group, c.scheme, c.window, c.hadamard, c.dtype, c.offset,
                                                c.quantized, c.recent_keys.shape) == fmt for c in cache):
        return None
    if first.keys.shape[0] != 1 or first.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    quantized, held, room = first.quantized, first.offset - first.quantized, first.recent_keys.shape[2]
    if first.keys.per_channel and (not room or held == room):
        return None  # the step closes a key group: quantized per channel, op at a time
    if not room or held == room:  # the token (or the window's oldest) goes into the codes
        for c in cache:
            for buffer in (c.keys, c.values):
                if quantized + 1 > buffer.capacity:
                    buffer._grow(quantized + 1, quantized)
        after = quantized + 1
    else:
        after = quantized
    return (quantized, held, first.bits, first.keys.group, first.values.group, first.keys.per_channel,
            first.hadamard), after


def _paged(cache: list, pos: int) -> torch.Tensor | None:
    """The page tables (layers, pages) int64 of PagedKVCaches of one CPU pool, with the blocks that storing the token
    at `pos` needs taken now (PoolExhausted, offsets unchanged, where there are too few), else None."""
    pool = cache[0].pool
    if not all(type(c) is PagedKVCache and c.pool is pool for c in cache) or not pool.arena.is_cpu \
            or pool.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    for c in cache:
        c.reserve(pos + 1)
    pages = -(-(pos + 1) // pool.block_tokens)
    return torch.tensor([c.table[:pages] for c in cache], dtype=torch.long)


def _paged_forward(plan: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list, pos: int,
                   tables: torch.Tensor, tap: torch.Tensor | None) -> torch.Tensor:
    """The step over the pool's fields: dense K/V, or codes quantized at `pos` (no window: empty ones of the pool's
    dtype, which the token is rounded to before it is quantized)."""
    pool, n = cache[0].pool, len(cache)
    if not pool.fmt.quantized:
        return plan.forward(h, cos, sin, [pool.fields["keys"]] * n, [pool.fields["values"]] * n, pos, tables)
    none = torch.empty(1, pool.kv_heads, 0, pool.head_dim, dtype=pool.dtype)
    fields = [pool.fields[f"{kv}.{part}"] for kv in ("keys", "values") for part in ("data", "scales", "zeros")]
    return plan.forward_packed(h, cos, sin, [[*fields, none, none]] * n, pos, pos, 0, pool.bits, pool.group,
                               pool.group, False, pool.hadamard, tap, tables)


def _current(model: Any) -> FusedStep | None:
    """The model's plan, rebuilt when a weight it read was swapped; None where the step does not cover the model."""
    fused = model.__dict__.get("_fused")
    if fused is None or (fused is not False and not fused.current()):
        fused = build(model) or False
        model.__dict__["_fused"] = fused
    return fused or None


def multi_step(model: Any, tokens: torch.Tensor, cache: list) -> torch.Tensor | None:
    """Logits (1, T, vocab) for 2..MANY_MAX tokens of one sequence through the fused step, each weight read once for
    all of them (a speculative check, a short prompt), or None to run op at a time. Row t's logits are those one
    decode step at that position gives, bit for bit: checking drafts changes no greedy choice."""
    t = tokens.shape[1]
    if tokens.shape[0] != 1 or not 1 < t <= MANY_MAX or torch.is_grad_enabled() or not enabled() or not cache:
        return None
    registry = model.__dict__.get("adapters")
    if registry is not None and registry.rows is not None:  # adapters' paths: op at a time
        return None
    if not all(type(c) is DenseKVCache and c.keys.shape[0] == 1 for c in cache):
        return None
    pos = cache[0].offset
    window = model.args.sliding_window
    if (window is not None and pos + t > window) or any(c.offset != pos for c in cache):
        return None
    fused = _current(model)
    if fused is None:
        return None
    fused.select(None)
    if not fused.plan.covers_many():
        return None
    for c in cache:
        if pos + t > c.capacity:
            c._grow(pos + t)
    h = model.model.embed_tokens(tokens).reshape(t, -1).float().contiguous()
    cos, sin = model.rope.cos_sin(torch.arange(pos, pos + t).unsqueeze(0), torch.float32)
    cos, sin = cos.reshape(t, -1).contiguous(), sin.reshape(t, -1).contiguous()
    logits = fused.plan.forward_many(h, cos, sin, [c.keys for c in cache], [c.values for c in cache], pos)
    for c in cache:
        c.offset = pos + t
    return logits.to(model.dtype).view(1, t, -1)


def decode_step(model: Any, tokens: torch.Tensor, cache: list, tap: torch.Tensor | None = None) -> torch.Tensor | None:
    """Logits (1, 1, vocab) for one token of one sequence through the fused step, or None to run op at a time.

    `tap` (layers, 2, kv_heads * head_dim) fp32, over quantized caches, receives the K/V rows stored (for tests)."""
    if tokens.shape != (1, 1) or torch.is_grad_enabled() or not enabled() or not cache:
        return None
    registry = model.__dict__.get("adapters")
    adapter = None if registry is None or registry.rows is None else registry.rows[0]
    paged = type(cache[0]) is PagedKVCache
    dense = all(type(c) is DenseKVCache and c.keys.shape[0] == 1 for c in cache)
    if not dense and not paged and type(cache[0]) is not QuantizedKVCache:
        return None
    pos = cache[0].offset
    window = model.args.sliding_window
    if (window is not None and pos + 1 > window) or any(c.offset != pos for c in cache):
        return None
    fused = _current(model)
    if fused is None:
        return None
    fused.select(adapter)
    if paged:
        tables = _paged(cache, pos)
        if tables is None:
            return None
    elif dense:
        for c in cache:
            if pos + 1 > c.capacity:
                c._grow(pos + 1)
    else:
        packed = _packed(cache)
        if packed is None:
            return None
    h = model.model.embed_tokens(tokens).reshape(-1).float()
    cos, sin = model.rope.cos_sin_at(pos)
    if paged:
        logits = _paged_forward(fused.plan, h, cos, sin, cache, pos, tables, tap)
    elif dense:
        logits = fused.plan.forward(h, cos, sin, [c.keys for c in cache], [c.values for c in cache], pos)
    else:
        layers = [[c.keys.data, c.keys.scales, c.keys.zeros, c.values.data, c.values.scales, c.values.zeros,
                   c.recent_keys, c.recent_values] for c in cache]
        args, quantized = packed
        logits = fused.plan.forward_packed(h, cos, sin, layers, pos, *args, tap)
        for c in cache:
            c.quantized = quantized
    for c in cache:
        c.offset = pos + 1
    if fused.settle is not None:
        fused.settle()
    return logits.to(model.dtype).view(1, 1, -1)

"""The planner's per-op cost model: what each op of a step reads and computes, and how long a device takes for it.

A datasheet device: time(op) = max(FLOPs / compute rate, bytes / memory rate) + dispatch overhead.

A calibrated CPU runs the step as edgellm's engine does, each part timed by `plan calibrate` (profile.py):
- one sequence's decode step is one native call for every layer (models/fused.py): each projection reads its
  weight as stored at the format's measured rate (times how much faster the measured cyclic read of the step's
  working set runs than one from DRAM: near the last-level cache's size part of it stays cached), plus a
  measured cost per output row (short rows pay their
  reduction and store), plus attention at the fused kernel's measured FLOP rate, plus the step's and each layer's
  fixed cost, and per expert an MoE layer runs a measured cost beyond its weights;
- a batched decode step and a prefill run op at a time: each linear layer costs what the kernel the row count
  selects (table lookup, VNNI, dequantize + GEMM, dense GEMV/GEMM) was measured to cost per weight, per output and
  input feature and per call at that count; prefill adds causal attention (measured per head size and length), the
  element-wise work per token, and a cost per layer; an MoE layer runs each expert it hits on that expert's tokens,
  which for a prefill is a few rows each, so the small-row kernels set the price.
An op's bound is then the larger of its two roofs (FLOPs at the GEMM peak, bytes at DRAM speed) or, where the
measured time exceeds both by more, the overhead (dispatch, dequantization, kernel inefficiency).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import InvalidRequestError
from edgellm.layouts import KVFormat
from edgellm.perf.profile import ThreadRates
from edgellm.perf.weights import DENSE_BYTES, STORE_DTYPE_BYTES, bytes_per_weight, has_load_time_lut, head_format


@dataclass(frozen=True)
class ModelSpec:
    """The hyper-parameters cost depends on, read from a HF config.json (or a catalog copy of one)."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    moe_layers: int = 0
    window: int | None = None
    window_layers: int = 0  # layers whose attention reads only the last `window` tokens

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> ModelSpec:
        """A spec from config.json's fields (Llama, Qwen2/3, Qwen-MoE, Mixtral, OLMoE, gpt-oss)."""
        try:
            heads, layers = int(config["num_attention_heads"]), int(config["num_hidden_layers"])
            hidden = int(config["hidden_size"])
            experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
            dense = config.get("mlp_only_layers") or []
            step = int(config.get("decoder_sparse_step") or 1)
            moe_layers = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0) if experts else 0
            types = config.get("layer_types") or []
            window = config.get("sliding_window")
            windowed = sum(t == "sliding_attention" for t in types) if types else (layers if window else 0)
            if config.get("model_type") in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") \
                    and not config.get("use_sliding_window", False):
                window, windowed = None, 0
            if config.get("model_type") == "gpt_oss" and not types:
                windowed = layers // 2 + layers % 2  # transformers' default: sliding, full, sliding, ...
            return cls(
                name=name or config.get("_name_or_path", "") or config.get("model_type", "model"),
                model_type=str(config.get("model_type", "llama")), hidden=hidden, layers=layers, heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config.get("intermediate_size") or 0), vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)), experts=experts,
                experts_per_token=int(config.get("num_experts_per_tok") or 0) if experts else 0,
                expert_intermediate=int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0),
                shared_intermediate=int(config.get("shared_expert_intermediate_size") or 0),
                moe_layers=moe_layers, window=int(window) if window and windowed else None,
                window_layers=windowed if window else 0)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"config of {name or 'the model'} lacks or mangles a field the planner needs "
                                      f"({e})") from None

    @property
    def is_moe(self) -> bool:
        return self.moe_layers > 0

    @property
    def attention_params(self) -> int:
        """q, k, v and o projections of one layer."""
        return 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def expert_params(self) -> int:
        """One routed expert's gate, up and down projections."""
        return 3 * self.hidden * self.expert_intermediate

    def ffn_params(self, active: bool) -> int:
        """Every layer's feed-forward projections; `active`: only the top-k experts one token uses (plus routers)."""
        dense = (self.layers - self.moe_layers) * 3 * self.hidden * self.intermediate
        per_moe = self.experts_per_token if active else self.experts
        moe = self.moe_layers * (per_moe * self.expert_params + 3 * self.hidden * self.shared_intermediate)
        return dense + moe

    def projection_params(self, active: bool = False) -> int:
        """The weights a format quantizes: attention and feed-forward projections in every layer."""
        return self.layers * self.attention_params + self.ffn_params(active)

    @property
    def router_params(self) -> int:
        return self.moe_layers * self.hidden * self.experts

    @property
    def table_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def parameters(self) -> int:
        """Unique weights, a tied head counted once; norms included, biases and q/k norms left out (< 0.1%)."""
        norms = (2 * self.layers + 1) * self.hidden
        return (self.projection_params() + self.router_params + self.table_params * (1 if self.tied else 2)
                + norms)

    @property
    def active_parameters(self) -> int:
        """The weights one token runs through (the embedding's one row left out)."""
        return self.projection_params(active=True) + self.router_params + self.table_params

    def kv_bytes_per_token(self, kv: KVFormat) -> float:
        return kv.bytes_per_token(_KVShape(self.layers, self.kv_heads, self.head_dim))

    def attended(self, context: int) -> float:
        """Cached tokens attention reads per query, summed over layers and divided by layers (sliding layers cap)."""
        if not self.window_layers or self.window is None:
            return float(context)
        capped = min(context, self.window)
        return (self.window_layers * capped + (self.layers - self.window_layers) * context) / self.layers


@dataclass(frozen=True)
class _KVShape:
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int


@dataclass(frozen=True)
class WeightMemory:
    """Bytes the loaded weights hold: projections in the format, head, token table, norms."""

    projections: float
    head: float
    table: float
    other: float
    lut_copy: float = 0.0  # intN/ternary: the table-lookup kernel's repacked copy, made at load

    @property
    def total(self) -> float:
        return self.projections + self.head + self.table + self.other + self.lut_copy


def weight_memory(spec: ModelSpec, fmt: str) -> WeightMemory:
    """What the loader holds in RAM for `spec` in `fmt`: a quantized model keeps its table in bf16 and runs its head
    from a Q8_0 copy, Q4_0 under 2-bit formats (a tied table stays for lookups), intN/ternary weights also as the
    lookup kernel's copy (as many bytes); a dense model holds every tensor in its dtype. Q4_0 adds a lookup copy
    later, at the first batched or speculative step (quant.linear), which this leaves out."""
    other = (2 * spec.layers + 1) * spec.hidden + spec.router_params
    if fmt in DENSE_BYTES:
        size = DENSE_BYTES[fmt]
        return WeightMemory(spec.projection_params() * size, 0 if spec.tied else spec.table_params * size,
                            spec.table_params * size, other * size)
    projections = spec.projection_params() * bytes_per_weight(fmt)
    return WeightMemory(projections, spec.table_params * bytes_per_weight(head_format(fmt)),
                        spec.table_params * STORE_DTYPE_BYTES, other * STORE_DTYPE_BYTES,
                        projections if has_load_time_lut(fmt) else 0.0)


@dataclass
class Op:
    """One kind of op in a step, summed over layers: its work, the time each roof allows, and which one binds."""

    name: str
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    overhead_s: float = 0.0
    disk_s: float = 0.0
    measured_s: float | None = None  # a calibrated CPU: the time its measured kernels take (the roofs only label it)

    @property
    def seconds(self) -> float:
        if self.measured_s is not None:
            return self.measured_s + self.disk_s
        return max(self.compute_s, self.memory_s) + self.overhead_s + self.disk_s

    @property
    def bound(self) -> str:
        parts = {"compute": self.compute_s, "memory": self.memory_s, "overhead": self.overhead_s, "disk": self.disk_s}
        return max(parts, key=parts.get)

    def to_json(self) -> dict:
        return {"op": self.name, "gflop": self.flops / 1e9, "mbytes": self.bytes / 1e6, "ms": 1000 * self.seconds,
                "bound": self.bound, "intensity_flop_per_byte": self.flops / self.bytes if self.bytes else None}


def unique_experts(experts: int, k: int, tokens: int) -> float:
    """Expected distinct experts `tokens` tokens route to, each picking k of `experts` uniformly: what a batched or
    prefill MoE layer reads."""
    return experts * (1 - (1 - k / experts) ** tokens) if experts else 0.0


def _op(name: str, flops: float, nbytes: float, gemm_gflops: float, gbs: float) -> Op:
    return Op(name, flops, nbytes, flops / (gemm_gflops * 1e9), nbytes / (gbs * 1e9))


def _measured(name: str, flops: float, nbytes: float, seconds: float, rates: ThreadRates) -> Op:
    """An op timed by calibration, labelled against the roofs (best GEMM FLOP/s, DRAM read GB/s)."""
    compute = flops / (max(rates.gemm_gflops.values()) * 1e9)
    memory = nbytes / (rates.dram_gbs * 1e9)
    return Op(name, flops, nbytes, compute, memory, max(0.0, seconds - max(compute, memory)), measured_s=seconds)


def decode_ops(spec: ModelSpec, fmt: str, kv: KVFormat, context: int, batch: int, rates: ThreadRates,
               expert_resident: float = 1.0, expert_miss_s_per_byte: float = 0.0) -> list[Op]:
    """One decode step of `batch` sequences at `context` cached tokens each, op by op.

    Weights are read once per step whatever the batch (that is why batching pays); each sequence reads its own
    KV. MoE offload: `expert_resident` of the expert bytes a step reads are in memory, the rest cost
    `expert_miss_s_per_byte` each (a slower tier: disk, or host RAM over an accelerator's link).
    """
    if rates.measured:
        ops = measured_decode_ops(spec, fmt, kv, context, batch, rates)
        if spec.is_moe:
            expert = next(op for op in ops if op.name == "moe experts")
            read = unique_experts(spec.experts, spec.experts_per_token, batch) * spec.expert_params
            expert.disk_s = spec.moe_layers * read * (1 - expert_resident) * bytes_per_weight(fmt) \
                * expert_miss_s_per_byte
        return ops
    bpw = bytes_per_weight(fmt)
    gbs, gflops = rates.weight_gbs_for(fmt, batch), rates.gemm_gflops_for(fmt)
    ops = [_op("attention projections", 2 * batch * spec.layers * spec.attention_params,
               spec.layers * spec.attention_params * bpw, gflops, gbs)]
    kv_bytes = spec.kv_bytes_per_token(kv) * spec.attended(context) * batch
    attn_flops = 4 * batch * spec.layers * spec.heads * spec.head_dim * spec.attended(context)
    ops.append(_op("attention (KV read)", attn_flops, kv_bytes, rates.attention_gflops, rates.kv_gbs))
    dense_mlp = (spec.layers - spec.moe_layers) * 3 * spec.hidden * spec.intermediate
    if dense_mlp:
        ops.append(_op("mlp", 2 * batch * dense_mlp, dense_mlp * bpw, gflops, gbs))
    if spec.is_moe:
        ops.append(_op("moe router", 2 * batch * spec.router_params, spec.router_params * 2, gflops, gbs))
        read = unique_experts(spec.experts, spec.experts_per_token, batch) * spec.expert_params
        shared = 3 * spec.hidden * spec.shared_intermediate
        expert = _op("moe experts", 2 * batch * spec.moe_layers * (spec.experts_per_token * spec.expert_params
                                                                   + shared),
                     spec.moe_layers * (read * expert_resident + shared) * bpw, gflops, gbs)
        expert.disk_s = spec.moe_layers * read * (1 - expert_resident) * bpw * expert_miss_s_per_byte
        expert.overhead_s = spec.moe_layers * unique_experts(spec.experts, spec.experts_per_token, batch) \
            * rates.expert_overhead_s
        ops.append(expert)
    head_fmt = head_format(fmt)
    head_bpw = bytes_per_weight(head_fmt)
    ops.append(_op("lm_head", 2 * batch * spec.table_params, spec.table_params * head_bpw,
                   rates.gemm_gflops_for(head_fmt), rates.weight_gbs_for(head_fmt, batch)))
    if batch == 1:
        overhead = rates.step_overhead_s + spec.layers * rates.layer_overhead_s
    else:
        overhead = rates.batch_step_overhead_s + spec.layers * (rates.batch_layer_overhead_s
                                                                + batch * rates.sequence_overhead_s)
    ops.append(Op("dispatch", 0, 0, 0, 0, overhead))
    return ops


def prefill_ops(spec: ModelSpec, fmt: str, tokens: int, rates: ThreadRates) -> list[Op]:
    """A cold prefill of `tokens` prompt tokens: GEMMs at the format's prefill rate, causal attention, the head for
    the last token only (the engine computes no other logits)."""
    if rates.measured:
        return measured_prefill_ops(spec, fmt, tokens, rates)
    bpw = bytes_per_weight(fmt)
    gflops, gbs = rates.gemm_gflops_for(fmt), rates.weight_gbs_for(fmt)
    routed = spec.moe_layers * spec.experts * spec.expert_params
    read = spec.projection_params() - routed + routed * unique_experts(spec.experts, spec.experts_per_token,
                                                                       tokens) / max(spec.experts, 1)
    ops = [_op("projections (GEMM)", 2 * tokens * spec.projection_params(active=True), read * bpw, gflops,
               gbs)]
    ops[0].overhead_s = spec.moe_layers * unique_experts(spec.experts, spec.experts_per_token, tokens) \
        * rates.expert_overhead_s
    pairs_full = tokens * (tokens + 1) / 2
    w = spec.window or tokens
    pairs_window = pairs_full if tokens <= w else w * (w + 1) / 2 + (tokens - w) * w
    pairs = (spec.layers - spec.window_layers) * pairs_full + spec.window_layers * pairs_window
    ops.append(_op("attention (causal)", 4 * spec.heads * spec.head_dim * pairs, 0,
                   rates.attention_gflops, rates.kv_gbs))
    head_fmt = head_format(fmt)
    ops.append(_op("lm_head (last token)", 2 * spec.table_params, spec.table_params * bytes_per_weight(head_fmt),
                   rates.gemm_gflops_for(head_fmt), rates.weight_gbs_for(head_fmt)))
    ops.append(Op("dispatch", 0, 0, 0, 0, rates.prefill_overhead_s))
    return ops


def total_seconds(ops: list[Op]) -> float:
    return sum(op.seconds for op in ops)


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers of a step that run alike: their weights, output and input features and calls, summed over
    layers."""

    name: str
    fmt: str
    params: float
    out_rows: float
    in_width: float
    calls: float


def _router_format(fmt: str) -> str:
    return fmt if fmt in DENSE_BYTES else "bf16"  # `edgellm quantize` leaves the router in the stored dtype


def linear_groups(spec: ModelSpec, fmt: str) -> list[LinearGroup]:
    """Attention projections, dense MLPs and MoE routers of every layer, as the engine calls them: a bf16 model
    runs q/k/v and gate/up fused (one call each), other formats one call per projection."""
    fused = fmt == "bf16"
    h, q, kv = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    groups = [LinearGroup("attention projections", fmt, spec.layers * spec.attention_params,
                          spec.layers * (q + 2 * kv + h), spec.layers * ((1 if fused else 3) * h + q),
                          spec.layers * (2 if fused else 4))]
    dense = spec.layers - spec.moe_layers
    if dense:
        groups.append(_mlp("mlp", fmt, dense, h, spec.intermediate, fused))
    if spec.is_moe:
        groups.append(LinearGroup("moe router", _router_format(fmt), spec.router_params,
                                  spec.moe_layers * spec.experts, spec.moe_layers * h, spec.moe_layers))
        if spec.shared_intermediate:
            groups.append(_mlp("moe shared expert", fmt, spec.moe_layers, h, spec.shared_intermediate, fused))
    return groups


def _mlp(name: str, fmt: str, count: float, hidden: int, intermediate: int, fused: bool) -> LinearGroup:
    """`count` gated MLPs (gate and up fused into one call where `fused`)."""
    return LinearGroup(name, fmt, count * 3 * hidden * intermediate, count * (2 * intermediate + hidden),
                       count * ((1 if fused else 2) * hidden + intermediate), count * (2 if fused else 3))


def expert_group(spec: ModelSpec, fmt: str, experts: float) -> LinearGroup:
    """`experts` routed experts' projections (never fused: each expert's gate and up stay apart)."""
    return _mlp("moe experts", fmt, experts, spec.hidden, spec.expert_intermediate, False)


def measured_decode_ops(spec: ModelSpec, fmt: str, kv: KVFormat, context: int, batch: int,
                        rates: ThreadRates) -> list[Op]:
    """A decode step on a calibrated CPU: one sequence through the fused native step, a batch op at a time."""
    ops = []
    kv_bytes = spec.kv_bytes_per_token(kv) * spec.attended(context) * batch
    kv_flops = 4 * batch * spec.layers * spec.heads * spec.head_dim * spec.attended(context)
    # what the fused step reads again every step (an MoE's experts over a few steps): a model near the last-level
    # cache's size streams faster than the DRAM rate its weights were timed at
    speedup = rates.stream_speedup(spec.projection_params() * bytes_per_weight(fmt) + kv_bytes
                                   + spec.table_params * bytes_per_weight(head_format(fmt)))

    def weights(g: LinearGroup, rows: int = batch, flops_rows: float = batch) -> Op:
        nbytes = g.params * bytes_per_weight(g.fmt)
        if batch == 1:
            seconds = nbytes / (rates.weight_gbs_for(g.fmt) * speedup * 1e9) + g.out_rows * rates.row_s_for(g.fmt)
        else:
            seconds = rates.linear_s(g.fmt, rows, g.params, g.out_rows, g.in_width, g.calls)
        return _measured(g.name, 2 * flops_rows * g.params, nbytes, seconds, rates)

    for g in linear_groups(spec, fmt):
        ops.append(weights(g))
    # the fused kernel's attention is bound by its arithmetic (every query head of a group re-reads a KV row from
    # the cache), a dense MHA cache by the read
    kv_s = max(kv_flops / (rates.attention_gflops * 1e9), kv_bytes / (rates.dram_gbs * 1e9))
    ops.insert(1, _measured("attention (KV read)", kv_flops, kv_bytes, kv_s, rates))
    if spec.is_moe:
        hit = unique_experts(spec.experts, spec.experts_per_token, batch)
        rows = max(1, round(batch * spec.experts_per_token / hit))  # each expert it hits runs on its own tokens
        expert = weights(expert_group(spec, fmt, spec.moe_layers * hit), rows, batch * spec.experts_per_token / hit)
        per_expert = rates.fixed_s(fmt, "expert_s", rates.expert_overhead_s) if batch == 1 else \
            rates.fixed_s(fmt, "expert_op_s", rates.expert_op_s)
        fixed = spec.moe_layers * hit * per_expert
        if batch > 1:  # op at a time: each routed (sequence, expert) pair gathered and scattered
            fixed += spec.moe_layers * batch * spec.experts_per_token * rates.fixed_s(fmt, "expert_pair_s", 0.0)
        expert.measured_s += fixed
        expert.overhead_s += fixed
        ops.append(expert)
    ops.append(weights(LinearGroup("lm_head", head_format(fmt), spec.table_params, spec.vocab, spec.hidden, 1)))
    if batch == 1:
        overhead = rates.fixed_s(fmt, "step_s", rates.step_overhead_s) + spec.layers * rates.fixed_s(
            fmt, "layer_s", rates.layer_overhead_s)
    else:
        overhead = rates.batch_step_overhead_s + spec.layers * (rates.batch_layer_overhead_s
                                                                + batch * rates.sequence_overhead_s)
    ops.append(Op("dispatch", 0, 0, 0, 0, overhead))
    return ops


def causal_pairs(spec: ModelSpec, tokens: int) -> float:
    """(query, key) pairs causal attention over a `tokens` prompt scores, summed over layers (sliding layers cap)."""
    full = tokens * (tokens + 1) / 2
    w = spec.window or tokens
    windowed = full if tokens <= w else w * (w + 1) / 2 + (tokens - w) * w
    return (spec.layers - spec.window_layers) * full + spec.window_layers * windowed


def measured_prefill_ops(spec: ModelSpec, fmt: str, tokens: int, rates: ThreadRates) -> list[Op]:
    """A prefill on a calibrated CPU, op at a time: every linear layer at `tokens` rows, MoE experts at the rows
    each one gets, attention per head, the element-wise work per token, the head for the last token only."""
    ops = [_measured(g.name, 2 * tokens * g.params, g.params * bytes_per_weight(g.fmt),
                     rates.linear_s(g.fmt, tokens, g.params, g.out_rows, g.in_width, g.calls), rates)
           for g in linear_groups(spec, fmt)]
    ffn = (spec.layers - spec.moe_layers) * spec.intermediate
    if spec.is_moe:
        hit = unique_experts(spec.experts, spec.experts_per_token, tokens)
        rows = max(1, round(tokens * spec.experts_per_token / hit))
        g = expert_group(spec, fmt, spec.moe_layers * hit)
        ops.append(_measured("moe experts", 2 * tokens * spec.experts_per_token * spec.moe_layers * spec.expert_params,
                             g.params * bytes_per_weight(fmt),
                             rates.linear_s(fmt, rows, g.params, g.out_rows, g.in_width, g.calls)
                             + spec.moe_layers * hit * rates.fixed_s(fmt, "expert_op_s", rates.expert_op_s)
                             + spec.moe_layers * tokens * spec.experts_per_token
                             * rates.fixed_s(fmt, "expert_pair_s", 0.0), rates))
        ffn += spec.moe_layers * (spec.experts_per_token * spec.expert_intermediate + spec.shared_intermediate)
    pairs = causal_pairs(spec, tokens)
    ops.append(_measured("attention (causal)", 4 * spec.heads * spec.head_dim * pairs, 0,
                         spec.heads * rates.attention_s(spec.head_dim, tokens, pairs), rates))
    act = "fp32" if fmt == "fp32" else "bf16"
    elements = tokens * (spec.layers * spec.hidden + ffn)
    ops.append(_measured("element-wise (norms, RoPE, SiLU)", 0, 0,
                         elements * rates.elementwise_s.get(act, 0.0), rates))
    head = head_format(fmt)
    ops.append(_measured("lm_head (last token)", 2 * spec.table_params, spec.table_params * bytes_per_weight(head),
                         rates.linear_s(head, 1, spec.table_params, spec.vocab, spec.hidden, 1), rates))
    ops.append(Op("dispatch", 0, 0, 0, 0, rates.prefill_overhead_s + spec.layers * rates.prefill_layer_s))
    return ops

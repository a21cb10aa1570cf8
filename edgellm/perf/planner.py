"""One plan: memory, TTFT, decode and server speed, energy and MoE expert placement for a model on a device.

Everything here is arithmetic on a ModelSpec and a DeviceProfile (milliseconds to compute): nothing runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.layouts import KVFormat
from edgellm.perf.costmodel import ModelSpec, Op, decode_ops, prefill_ops, total_seconds, weight_memory
from edgellm.perf.profile import DeviceProfile
from edgellm.perf.weights import bytes_per_weight

GIB = 2**30
KV_FORMATS = ("fp16", "q8", "q4", "q4-kivi-h", "q2-kivi-h")


@dataclass(frozen=True)
class Request:
    """What the user asks about: the weight and KV formats, prompt context, concurrent sequences and threads."""

    fmt: str
    kv: KVFormat
    context: int
    concurrency: int = 1
    threads: int | None = None
    memory_budget: float | None = None  # bytes the model may hold in RAM (MoE: decides the expert placement)


@dataclass(frozen=True)
class Tier:
    name: str
    capacity: float  # bytes free for expert weights
    seconds_per_byte: float  # extra cost of reading one expert byte from here (0 for the fast tier)


def expert_placement(spec: ModelSpec, req: Request, device: DeviceProfile) -> dict:
    """Place the experts over the device's tiers so a step takes least time: each byte read from a slower tier costs
    more, so filling tiers fastest first is optimal (the cost is linear in bytes per tier). Routing is taken as
    uniform; edgellm's offload pins the most-routed experts, so a trained model's hit rate only improves on this."""
    fmt_bytes = bytes_per_weight(req.fmt)
    experts = spec.moe_layers * spec.experts * spec.expert_params * fmt_bytes
    rest = weight_memory(spec, req.fmt).total - experts
    kv = spec.kv_bytes_per_token(req.kv) * req.context * req.concurrency
    fast = (req.memory_budget if req.memory_budget is not None else device.memory_bytes) - rest - kv
    tiers = [Tier("memory", max(0.0, fast), 0.0)]
    if device.host_link_gbs:
        tiers.append(Tier("host RAM (link)", device.host_memory_bytes, 1 / (device.host_link_gbs * 1e9)))
    tiers.append(Tier("disk", float("inf"), 1 / (device.disk_gbs * 1e9)))
    placed, left = [], experts
    for tier in tiers:
        take = min(left, tier.capacity)
        placed.append({"tier": tier.name, "bytes": take, "share": take / experts if experts else 0.0})
        left -= take
    miss_s_per_byte = sum(p["share"] * t.seconds_per_byte for p, t in zip(placed, tiers, strict=True))
    resident = placed[0]["share"]
    return {"expert_bytes": experts, "placement": [p for p in placed if p["bytes"] > 0], "resident_share": resident,
            "miss_s_per_byte": miss_s_per_byte / (1 - resident) if resident < 1 else 0.0}


def decode_step(spec: ModelSpec, req: Request, device: DeviceProfile, batch: int) -> list[Op]:
    rates = device.rates(req.threads)
    if not spec.is_moe:
        return decode_ops(spec, req.fmt, req.kv, req.context, batch, rates)
    place = expert_placement(spec, req, device)
    return decode_ops(spec, req.fmt, req.kv, req.context, batch, rates, place["resident_share"],
                      place["miss_s_per_byte"])


def predict(spec: ModelSpec, req: Request, device: DeviceProfile) -> dict:
    """The plan as a JSON-ready dict: memory, TTFT, decode tok/s, server throughput, energy, per-op breakdown."""
    rates = device.rates(req.threads)
    weights = weight_memory(spec, req.fmt)
    kv_token = spec.kv_bytes_per_token(req.kv)
    decode = decode_step(spec, req, device, 1)
    server = decode_step(spec, req, device, req.concurrency)
    prefill = prefill_ops(spec, req.fmt, req.context, rates)
    step_s, server_s, ttft_s = total_seconds(decode), total_seconds(server), total_seconds(prefill)
    agents = {}
    for name in KV_FORMATS:
        per_agent = spec.kv_bytes_per_token(KVFormat.parse(name)) * req.context
        agents[name] = {"bytes_per_token": spec.kv_bytes_per_token(KVFormat.parse(name)),
                        "agents_per_gib": GIB / per_agent}
    out = {
        "model": spec.name, "format": req.fmt, "kv_format": str(req.kv), "context": req.context,
        "concurrency": req.concurrency, "threads": req.threads, "device": device.name, "device_kind": device.kind,
        "parameters": spec.parameters, "active_parameters": spec.active_parameters,
        "memory": {"weights_bytes": weights.total, "weights": vars(weights).copy(),
                   "kv_bytes_per_token": kv_token, "kv_bytes_per_agent": kv_token * req.context,
                   "total_bytes": weights.total + kv_token * req.context * req.concurrency,
                   "agents_per_gib": agents},
        "ttft_s": ttft_s, "prefill_tok_s": req.context / ttft_s,
        "decode_tok_s": 1 / step_s, "decode_step_ms": 1000 * step_s,
        "server_tok_s": req.concurrency / server_s,
        "decode_ops": [op.to_json() for op in decode], "prefill_ops": [op.to_json() for op in prefill],
        "decode_gbs": sum(op.bytes for op in decode) / step_s / 1e9,
    }
    if device.power_w:
        out["energy_j_per_token"] = device.power_w * step_s
        out["energy_j_per_token_server"] = device.power_w * server_s / req.concurrency
    if spec.is_moe:
        place = expert_placement(spec, req, device)
        out["moe"] = {"active_bytes_per_token": sum(op.bytes for op in decode if op.name != "attention (KV read)"),
                      "experts": f"{spec.experts_per_token} of {spec.experts} in {spec.moe_layers} layers", **place}
    return out

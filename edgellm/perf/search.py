"""Search the settings (weight format, KV format, threads, expert budget) for the fastest plans that fit in memory,
and keep the Pareto set of predicted decode speed against quality cost.

Quality cost is edgellm's own measured Δ perplexity per weight format and per KV format (catalog), added: a
format it never measured is left out rather than guessed.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import product

from edgellm.layouts import KVFormat
from edgellm.perf.catalog import KV_QUALITY_COST, WEIGHT_QUALITY_COST
from edgellm.perf.costmodel import ModelSpec
from edgellm.perf.planner import Request, predict
from edgellm.perf.profile import DeviceProfile

EXPERT_SHARES = (1.0, 0.5, 0.25, 0.1)  # shares of the expert bytes kept in RAM that an MoE search tries


def candidates(spec: ModelSpec, base: Request, device: DeviceProfile, memory: float) -> list[dict]:
    """Every setting's plan that fits in `memory` bytes (weights + KV of `base.concurrency` sequences)."""
    threads = [t for t in device.threads if t] or [None]
    rows = []
    for fmt, kv, t in product(WEIGHT_QUALITY_COST, KV_QUALITY_COST, threads):
        req = replace(base, fmt=fmt, kv=KVFormat.parse(kv), threads=t, memory_budget=memory)
        plan = predict(spec, req, device)
        total = plan["memory"]["total_bytes"]
        for share in EXPERT_SHARES if spec.is_moe else (1.0,):
            resident = total - plan["moe"]["expert_bytes"] * (1 - share) if spec.is_moe else total
            if resident > memory:
                continue
            shared = predict(spec, replace(req, memory_budget=resident), device) if spec.is_moe else plan
            rows.append({"format": fmt, "kv_format": kv, "threads": t,
                         "expert_share": share if spec.is_moe else None, "memory_bytes": resident,
                         "decode_tok_s": shared["decode_tok_s"], "ttft_s": shared["ttft_s"],
                         "quality_cost_pct": WEIGHT_QUALITY_COST[fmt] + KV_QUALITY_COST[kv]})
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both decode speed (higher) and quality cost (lower), fastest first."""
    front = [r for r in rows if not any(o["decode_tok_s"] >= r["decode_tok_s"]
                                        and o["quality_cost_pct"] <= r["quality_cost_pct"]
                                        and (o["decode_tok_s"], -o["quality_cost_pct"])
                                        != (r["decode_tok_s"], -r["quality_cost_pct"]) for o in rows)]
    return sorted(front, key=lambda r: -r["decode_tok_s"])

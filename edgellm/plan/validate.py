"""`edgellm plan validate`: the planner's own error, predicted against measured on this machine, and against
published measurements from other hardware.

The validation models are random-init checkpoints of other shapes than the calibration model (a SmolLM2-135M-shaped
deep narrow model, a wide shallow one, a Qwen3-MoE), so the rates are tested where they were not fitted.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from edgellm.layouts import KVFormat
from edgellm.perf.catalog import DEVICES, MODELS, PUBLISHED
from edgellm.perf.costmodel import ModelSpec, weight_memory
from edgellm.perf.planner import Request, predict
from edgellm.perf.profile import DeviceProfile, ThreadRates
from edgellm.plan.measure import build_random, checkpoint, config_of, measure_checkpoint

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "wide-150m": dict(hidden_size=1536, num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=4,
                      intermediate_size=4096, vocab_size=16384, tie_word_embeddings=False),
    "moe-200m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                     num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, intermediate_size=1024,
                     vocab_size=8192, tie_word_embeddings=False),
    # the reduced set's (tests): small enough to build and run in seconds
    "tiny-dense": dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=512, vocab_size=2048, tie_word_embeddings=False),
}
# (shape, format, kind, threads, context or prompt tokens, batch)
FULL = [
    ("smollm2-135m", "fp32", "decode", 1, 128, 1), ("smollm2-135m", "fp32", "prefill", 1, 128, 1),
    ("smollm2-135m", "q4_0", "decode", 1, 512, 1), ("smollm2-135m", "q4_0", "decode", 2, 512, 1),
    ("smollm2-135m", "q4_0", "server", 1, 128, 4), ("smollm2-135m", "int2-g64", "decode", 1, 128, 1),
    ("smollm2-135m", "int2-g64", "prefill", 1, 512, 1),
    ("wide-150m", "bf16", "decode", 1, 2048, 1), ("wide-150m", "bf16", "prefill", 1, 1024, 1),
    ("wide-150m", "bf16", "server", 1, 128, 4), ("wide-150m", "q8_0", "decode", 2, 128, 1),
    ("wide-150m", "q8_0", "prefill", 1, 512, 1), ("wide-150m", "q8_0", "server", 1, 128, 16),
    ("moe-200m", "q4_0", "decode", 1, 128, 1), ("moe-200m", "q4_0", "prefill", 1, 256, 1),
    ("moe-200m", "bf16", "decode", 1, 512, 1),
]
REDUCED = [("tiny-dense", "bf16", "decode", 1, 64, 1), ("tiny-dense", "bf16", "prefill", 1, 128, 1),
           ("tiny-dense", "q4_0", "decode", 1, 64, 1), ("tiny-dense", "q4_0", "server", 1, 32, 4)]
METRIC = {"decode": "decode_tok_s", "prefill": "ttft_s", "server": "server_tok_s"}


def _plan(cases: list[tuple]) -> list[dict]:
    out = []
    for _, _, kind, threads, n, batch in cases:
        if kind == "prefill":
            out.append({"kind": "prefill", "threads": threads, "tokens": n})
        else:
            # 24 steps: on more threads a step no neighbour disturbed (no thread spinning at a barrier for one) is
            # rare, and an MoE's steps each route to other experts, some still in L3: the fastest of 8 moved ±20%
            out.append({"kind": "decode", "threads": threads, "context": n, "batch": batch, "steps": 24})
    return out


def _error(predicted: float, measured: float) -> float:
    return 100 * (predicted - measured) / measured


def scaled(rates: ThreadRates, factor: float) -> ThreadRates:
    """`rates` on a host running at `factor` of its calibrated speed: every rate times it, every time over it (on the
    CPU clock a neighbour's memory traffic still stalls every cache miss, overheads' too)."""
    def times(table: dict[str, float]) -> dict[str, float]:
        return {k: v * factor for k, v in table.items()}

    def over(table: dict[str, float]) -> dict[str, float]:
        return {k: v / factor for k, v in table.items()}

    seconds = ("weight_s", "row_s", "input_s", "call_s", "pair_s")
    linear = {f: [{k: v / factor if k in seconds else v for k, v in p.items()} for p in points]
              for f, points in rates.linear.items()}
    attention = [{k: v / factor if k in seconds else v for k, v in p.items()} for p in rates.attention]
    return replace(rates, dram_gbs=rates.dram_gbs * factor, weight_gbs=times(rates.weight_gbs),
                   gemm_gflops=times(rates.gemm_gflops), attention_gflops=rates.attention_gflops * factor,
                   kv_gbs=rates.kv_gbs * factor, batch_weight_gbs=times(rates.batch_weight_gbs),
                   step_overhead_s=rates.step_overhead_s / factor, layer_overhead_s=rates.layer_overhead_s / factor,
                   batch_step_overhead_s=rates.batch_step_overhead_s / factor,
                   batch_layer_overhead_s=rates.batch_layer_overhead_s / factor,
                   sequence_overhead_s=rates.sequence_overhead_s / factor,
                   prefill_overhead_s=rates.prefill_overhead_s / factor,
                   expert_overhead_s=rates.expert_overhead_s / factor, weight_row_s=over(rates.weight_row_s),
                   linear=linear, attention=attention, elementwise_s=over(rates.elementwise_s),
                   prefill_layer_s=rates.prefill_layer_s / factor, expert_op_s=rates.expert_op_s / factor,
                   fixed={f: over(table) for f, table in rates.fixed.items()})


def load_factors(profile: DeviceProfile, threads: set[int]) -> dict[int, float]:
    """This moment's DRAM read bandwidth over the calibration's, per thread count, timed alike: on a shared
    host the neighbours' memory traffic moves every rate by about the same factor between calibration and
    validation (1 where the profile has no roofs)."""
    from edgellm.plan.calibrate import measure_read_gbs

    roofs = profile.extra.get("roofs", {})
    return {t: measure_read_gbs(t) / roofs[str(t)]["dram_gbs"] if str(t) in roofs else 1.0 for t in threads}


def validate(profile: DeviceProfile, cases: list[tuple] = FULL, work: Path | None = None, log=print,
             normalize: bool = True, rounds: int = 1) -> dict:
    """Build each shape, quantize it to each format, time `cases` in edgellm's engine and set each against the
    planner's prediction from `profile`; memory rows compare predicted with counted weight and KV bytes.

    `normalize`: scale the profile's rates by the host's load at each checkpoint (`load_factors`), as a planner
    on a shared machine would; the uncorrected predictions and their error are reported too. `rounds`: time every
    case that many times, a whole pass over the checkpoints apart, and keep each case's fastest round with that
    round's load factor: a neighbour busy for a minute slows one round of a case, not all of them (neighbours
    only ever slow a timing down)."""
    start = time.perf_counter()
    groups: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for case in cases:
        groups[case[:2]].append(case)
    best: dict[tuple[str, str], list[tuple[dict, float] | None]] = {key: [None] * len(g) for key, g in groups.items()}
    headers: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgellm-validate-", dir=work) as tmp:
        tmp, bases, paths, specs = Path(tmp), {}, {}, {}
        for shape, fmt in groups:
            if shape not in bases:
                bases[shape] = build_random(SHAPES[shape], tmp / shape)
                specs[shape] = ModelSpec.from_config(config_of(bases[shape]), shape)
            paths[shape, fmt] = checkpoint(bases[shape], fmt, tmp)
        for r in range(rounds):
            for key, group in groups.items():
                counts = {case[3] for case in group}
                before = load_factors(profile, counts) if normalize else {}
                headers[key], *timings = measure_checkpoint(str(paths[key][0]), paths[key][1], _plan(group))
                after = load_factors(profile, counts) if normalize else {}
                factors = {t: (before[t] * after[t]) ** 0.5 for t in before}  # the load around the timings
                for i, (case, timing) in enumerate(zip(group, timings, strict=True)):
                    kept = best[key][i]
                    if kept is None or timing["seconds"] < kept[0]["seconds"]:
                        best[key][i] = (timing, factors.get(case[3], 1.0))
                log(f"round {r + 1}/{rounds}: {key[0]} {key[1]}: {len(group)} case(s) measured "
                    f"({time.perf_counter() - start:.0f} s)")
    rows, memory = [], []
    for (shape, fmt), group in groups.items():
        header, spec = headers[shape, fmt], specs[shape]
        kv = KVFormat.parse(header["kv_dtype"])
        memory.append({"model": shape, "format": fmt, "what": "weights",
                       "predicted": weight_memory(spec, fmt).total, "measured": header["weight_bytes"]})
        memory.append({"model": shape, "format": fmt, "what": f"KV bytes/token ({kv})",
                       "predicted": spec.kv_bytes_per_token(kv), "measured": header["kv_bytes_per_token"]})
        for case, (timing, factor) in zip(group, best[shape, fmt], strict=True):
            _, _, kind, threads, n, batch = case
            req = Request(fmt, kv, n, batch, threads)
            here = replace(profile, threads={threads: scaled(profile.rates(threads), factor)})
            measured = {"decode": 1 / timing["seconds"], "prefill": timing["seconds"],
                        "server": batch / timing["seconds"]}[kind]
            rows.append({"model": shape, "format": fmt, "kind": kind, "threads": threads, "context": n,
                         "batch": batch, "metric": METRIC[kind],
                         "predicted": predict(spec, req, here)[METRIC[kind]],
                         "predicted_uncorrected": predict(spec, req, profile)[METRIC[kind]],
                         "load_factor": factor, "measured": measured, "contended": timing["contended"]})
    for row in rows + memory:
        row["error_pct"] = _error(row["predicted"], row["measured"])
    uncorrected = [{"error_pct": _error(r["predicted_uncorrected"], r["measured"])} for r in rows]
    return {"device": profile.name, "profile_kind": profile.kind,
            "clock": "thread CPU time on 1 thread; on more, wall time of steps with every thread on a CPU "
                     "(edgellm.plan.measure.best_seconds)", "rounds": rounds, "cases": rows, "memory": memory,
            "summary": summarize(rows, memory), "summary_uncorrected": summarize(uncorrected, []),
            "seconds": time.perf_counter() - start}


def summarize(rows: list[dict], memory: list[dict]) -> dict:
    """Median, 90th percentile and max |error| over the speed rows; max |error| over the memory rows."""
    errors = sorted(abs(r["error_pct"]) for r in rows)
    out = {"cases": len(rows)}
    if errors:
        out.update(median_abs_error_pct=statistics.median(errors),
                   p90_abs_error_pct=errors[min(len(errors) - 1, int(0.9 * len(errors)))],
                   max_abs_error_pct=errors[-1], within_25_pct=sum(e <= 25 for e in errors))
    if memory:
        out["memory_max_abs_error_pct"] = max(abs(m["error_pct"]) for m in memory)
    return out


def external() -> list[dict]:
    """The catalog's published points (llama.cpp's own scoreboards) against the planner's datasheet devices."""
    rows = []
    for point in PUBLISHED:
        spec = ModelSpec.from_config(MODELS[point["model"]], point["model"])
        plan = predict(spec, Request(point["format"], KVFormat.parse("fp16"), 128), DEVICES[point["device"]])
        predicted = plan[point["metric"]]
        rows.append({**point, "predicted": predicted, "error_pct": _error(predicted, point["value"])})
    return rows

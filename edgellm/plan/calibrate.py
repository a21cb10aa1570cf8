"""`edgellm plan calibrate`: measure this machine into a device profile the planner divides by.

The roofs (DRAM and cache read bandwidth, GEMM per dtype, disk read) are measured as `bench` does; the rates the cost
model uses are measured through edgellm's own engine, so they hold what a real step pays: dispatch overhead from tiny
models (2 and 8 layers: the per-step and per-layer costs; an 8-layer MoE: the per-expert cost), then per weight
format a random-init calibration model's decode (weight GB/s, dequantization included), batched decode and prefill
(GEMM GFLOP/s), and for bf16 a long context (KV read GB/s, attention GFLOP/s).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from edgellm.bench.common import torch_threads
from edgellm.kernels.native import cpu_flags
from edgellm.perf.costmodel import ModelSpec
from edgellm.perf.hardware import cpu_model_name, measure_gemm, measure_read_bandwidth
from edgellm.perf.profile import DeviceProfile, ThreadRates
from edgellm.plan.measure import build_random, checkpoint, config_of, measure_checkpoint

CALIBRATION_SHAPE = dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=2816, vocab_size=8192, tie_word_embeddings=False)
TINY_SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  vocab_size=512, tie_word_embeddings=False)
TINY_MOE = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32)  # 8 layers: the per-expert cost
FORMATS = ("fp32", "bf16", "q8_0", "q4_0", "int2-g64")  # other formats take the rates of the nearest in bits
SHORT, LONG, PROMPT, LONG_PROMPT, BATCH, STEPS = 32, 768, 256, 768, 4, 8


def _memory_bytes() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0.0


def measure_disk_gbs(directory: Path, mib: int = 256) -> float:
    """Cold sequential read of a file (page cache dropped for it first): what an offloaded expert costs."""
    path = directory / "disk-probe.bin"
    chunk = os.urandom(2**20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        while os.read(fd, 8 * 2**20):
            pass
        return mib * 2**20 / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)
        path.unlink()


def _roofs(threads: int) -> dict:
    with torch_threads(threads):
        return {"dram_gbs": measure_read_bandwidth(256, 3), "cache_gbs": measure_read_bandwidth(8, 5),
                "gemm_fp32": measure_gemm(torch.float32, 1024, 3), "gemm_bf16": measure_gemm(torch.bfloat16, 1024, 3)}


def _timings(rows: list[dict]) -> dict:
    return {(r["kind"], r["threads"], r.get("context", r.get("tokens")), r.get("batch", 1)): r["seconds"]
            for r in rows[1:]}


def calibrate(threads: list[int], formats: tuple[str, ...] = FORMATS, shape: dict = CALIBRATION_SHAPE,
              work: Path | None = None, log=print) -> DeviceProfile:
    """Measure and return this machine's profile at each thread count in `threads` (bf16 must be among `formats`:
    its long-context runs give the KV and attention rates)."""
    if "bf16" not in formats:
        raise ValueError("calibration needs bf16 among its formats")
    start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="edgellm-calibrate-", dir=work) as tmp:
        tmp = Path(tmp)
        disk = measure_disk_gbs(tmp)
        roofs = {t: _roofs(t) for t in threads}
        log(f"roofs: {roofs}, disk {disk:.2f} GB/s")
        overhead = {}
        for layers, moe in ((2, {}), (8, {}), ("moe", TINY_MOE)):
            depth = 8 if moe else layers
            path = build_random({**TINY_SHAPE, **moe, "num_hidden_layers": depth}, tmp / f"tiny{layers}")
            plan = [{"kind": "decode", "threads": t, "context": 16, "batch": b, "steps": 16} for t in threads
                    for b in (1, BATCH, 4 * BATCH)] + [{"kind": "prefill", "threads": t, "tokens": 16, "reps": 3}
                                                       for t in threads]
            overhead[layers] = _timings(measure_checkpoint(str(path), "fp32", plan))
        base = build_random(shape, tmp / "calibration")
        spec = ModelSpec.from_config(config_of(base), "calibration")
        by_format = {}
        for fmt in formats:
            path, dtype = checkpoint(base, fmt, tmp)
            plan = [item for t in threads for item in (
                {"kind": "decode", "threads": t, "context": SHORT, "steps": STEPS},
                {"kind": "decode", "threads": t, "context": SHORT, "batch": BATCH, "steps": STEPS},
                {"kind": "prefill", "threads": t, "tokens": PROMPT})]
            if fmt == "bf16":
                plan += [item for t in threads for item in (
                    {"kind": "decode", "threads": t, "context": LONG, "steps": STEPS},
                    {"kind": "prefill", "threads": t, "tokens": LONG_PROMPT, "reps": 1})]
            rows = measure_checkpoint(str(path), dtype, plan)
            by_format[fmt] = (rows[0]["decode_bytes"], _timings(rows))
            log(f"{fmt}: measured ({time.perf_counter() - start:.0f} s)")
    rates = {t: _rates(t, spec, roofs[t], overhead, by_format) for t in threads}
    return DeviceProfile(name=cpu_model_name(), kind="measured",
                         source=f"edgellm plan calibrate, {time.strftime('%Y-%m-%d')}",
                         memory_bytes=_memory_bytes(), disk_gbs=disk, threads=rates, cpu_flags=cpu_flags(),
                         extra={"machine": platform.machine(), "roofs": {str(t): r for t, r in roofs.items()},
                                "calibration_seconds": time.perf_counter() - start,
                                "torch": torch.__version__})


def _positive(x: float, floor: float) -> float:
    return max(x, floor)


def _rates(t: int, spec: ModelSpec, roofs: dict, overhead: dict, by_format: dict) -> ThreadRates:
    """Solve the timings for the rates: overheads from the tiny models, then each format's rates from what is left
    of the calibration model's time."""
    tiny2, tiny8 = overhead[2], overhead[8]
    layer0 = _positive((tiny8["decode", t, 16, 1] - tiny2["decode", t, 16, 1]) / 6, 0.0)
    step0 = _positive(tiny8["decode", t, 16, 1] - 8 * layer0, 0.0)
    b_layer0 = _positive((tiny8["decode", t, 16, BATCH] - tiny2["decode", t, 16, BATCH]) / 6, 0.0)
    seq0 = _positive((tiny8["decode", t, 16, 4 * BATCH] - tiny8["decode", t, 16, BATCH]) / (3 * BATCH * 8), 0.0)
    b_step0 = _positive(tiny8["decode", t, 16, BATCH] - 8 * (b_layer0 + BATCH * seq0), 0.0)
    prefill0 = tiny8["prefill", t, 16, 1]
    expert0 = _positive((overhead["moe"]["decode", t, 16, 1] - tiny8["decode", t, 16, 1]) / (8 * TINY_MOE[
        "num_experts_per_tok"]), 0.0)
    bf16 = by_format["bf16"][1]
    kv_per_token = spec.layers * 2 * spec.kv_heads * spec.head_dim * 2  # a bf16 model's dense cache
    weight_gbs, batch_gbs, gemm = {}, {}, {}
    fixed = step0 + spec.layers * layer0
    # the KV rate is a difference of two timings, which a busy host can shrink to noise: bound it by the rate the
    # same attention kernel's neighbour, the bf16 weight read, reaches (within 2x either way)
    bf16_gbs = by_format["bf16"][0] / 1e9 / _positive(bf16["decode", t, SHORT, 1] - fixed, 0.2 * bf16["decode", t,
                                                                                                     SHORT, 1])
    kv_gbs = kv_per_token * (LONG - SHORT) / 1e9 / _positive(bf16["decode", t, LONG, 1] - bf16["decode", t, SHORT, 1],
                                                             1e-6)
    kv_gbs = min(max(kv_gbs, bf16_gbs / 2), 2 * bf16_gbs)
    b_fixed = b_step0 + spec.layers * (b_layer0 + BATCH * seq0)
    for fmt, (nbytes, times) in by_format.items():
        kv_s = kv_per_token * SHORT / (kv_gbs * 1e9)
        weight_gbs[fmt] = nbytes / 1e9 / _positive(times["decode", t, SHORT, 1] - fixed - kv_s,
                                                   0.2 * times["decode", t, SHORT, 1])
        batch_gbs[fmt] = nbytes / 1e9 / _positive(times["decode", t, SHORT, BATCH] - b_fixed - BATCH * kv_s,
                                                  0.2 * times["decode", t, SHORT, BATCH])
    # prefill: t(N) = linear(N) + attention(N) + fixed; two bf16 lengths give the attention rate
    flops = 2 * spec.projection_params(active=True)
    attn_flops = {n: 4 * spec.layers * spec.heads * spec.head_dim * n * (n + 1) / 2 for n in (PROMPT, LONG_PROMPT)}
    per_token = {n: (bf16["prefill", t, n, 1] - prefill0) / n for n in (PROMPT, LONG_PROMPT)}
    extra = per_token[LONG_PROMPT] - per_token[PROMPT]  # seconds per token the longer prompt's attention adds
    attention_gflops = (attn_flops[LONG_PROMPT] / LONG_PROMPT - attn_flops[PROMPT] / PROMPT) / 1e9 / _positive(extra,
                                                                                                               1e-9)
    bf16_gflops = flops * PROMPT / 1e9 / (bf16["prefill", t, PROMPT, 1] - prefill0)
    attention_gflops = min(max(attention_gflops, bf16_gflops / 10), bf16_gflops)  # likewise bounded
    for fmt, (_, times) in by_format.items():
        attn_s = attn_flops[PROMPT] / (attention_gflops * 1e9)
        linear_s = _positive(times["prefill", t, PROMPT, 1] - prefill0 - attn_s, 0.2 * times["prefill", t, PROMPT, 1])
        gemm[fmt] = flops * PROMPT / 1e9 / linear_s
    return ThreadRates(dram_gbs=roofs["dram_gbs"], weight_gbs=weight_gbs, gemm_gflops=gemm,
                       attention_gflops=attention_gflops, kv_gbs=kv_gbs, batch_weight_gbs=batch_gbs,
                       step_overhead_s=step0, layer_overhead_s=layer0, batch_step_overhead_s=b_step0,
                       batch_layer_overhead_s=b_layer0, sequence_overhead_s=seq0, prefill_overhead_s=prefill0,
                       expert_overhead_s=expert0)

"""`edgellm plan calibrate`: measure this machine into a device profile the planner sums.

The roofs (DRAM read bandwidth, GEMM per dtype, disk read) are measured as `bench` does; what the cost model adds up
is measured through edgellm's own engine and kernels, on random-init models of two shapes (a 1024-wide one and a
384-wide one: a projection's time is a cost per weight plus a cost per output row, and only two widths tell the two
apart), of a tiny one (hidden 64: what a call, a layer and a step cost with next to no weights) and an MoE:

- the fused batch-1 decode step per weight format: weight GB/s and seconds per output row (two widths), the step's
  and each layer's fixed cost (tiny models of 2 and 8 layers), its attention (a long context against a short one);
- the op-at-a-time linear layers per format at each row count from 1 to 1024 and at each kernel crossover: a cost
  per weight, per output and input feature and per call, fitted over every projection shape of the three models,
  for batched decode and prefill;
- the read rate by working set (8-256 MiB read over and over, as decode reads its weights), so a model near the
  last-level cache's size is credited with what stays cached between steps;
- prefill attention per head size and prompt length (SDPA, as the engine calls it) and the element-wise work per
  token (SiLU, norms, residual adds) measured directly, batched decode's cost per layer and per sequence, and an
  MoE layer's cost per expert and per routed (token, expert) pair beyond its weights.

Every timing of weights evicts them from the cache first (they come from DRAM, as for any real model): a decode step
only the model's weights (WeightFlush: its activations, KV cache and plan stay cached, as in a running model), an
op-at-a-time call the whole cache; the tiny models' fixed costs are timed warm. Every timing is taken as
measure.best_seconds takes it (CPU time on one thread; on more, only steps no neighbour stalled).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from edgellm.bench.common import torch_threads
from edgellm.kernels.native import cpu_flags
from edgellm.layouts import KVFormat
from edgellm.perf.costmodel import (
    ModelSpec,
    linear_groups,
    measured_decode_ops,
    measured_prefill_ops,
    total_seconds,
    unique_experts,
)
from edgellm.perf.hardware import cpu_model_name, measure_gemm
from edgellm.perf.profile import DeviceProfile, ThreadRates
from edgellm.perf.weights import DENSE_BYTES, bytes_per_weight, head_format
from edgellm.plan.measure import CacheFlush, Engine, WeightFlush, best_seconds, build_random, checkpoint, config_of

CALIBRATION_SHAPE = dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=2816, vocab_size=8192, tie_word_embeddings=False)
NARROW_SHAPE = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=2,
                    intermediate_size=1024, vocab_size=8192, tie_word_embeddings=False)
TINY_SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  vocab_size=512, tie_word_embeddings=False)
# an MoE of tiny experts, timed warm like the tiny dense models: what an expert costs besides its weights (routing,
# gathering its tokens, its small calls). Real-sized experts timed from DRAM left a residual per expert of 15-75 us,
# mostly their short weight streams read slower than the long ones the rates come from, which a model whose expert
# weights partly stay cached does not pay: validated MoE rows came out 22-32% off, and within 9% without it.
MOE_SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                 vocab_size=512, tie_word_embeddings=False)
FORMATS = ("fp32", "bf16", "q8_0", "q4_0", "int2-g64")  # other formats take the rates of the nearest in bits
ROWS = (1, 4, 16, 64, 256, 1024)  # op-at-a-time row counts; each kernel crossover below 1024 is added on both sides
# LONG: the fused attention's share must stand well above a neighbour's noise in the step time
SHORT, LONG, TINY_PROMPT, MOE_PROMPTS, BATCHES, STEPS = 32, 2048, 32, (64, 256), (4, 8, 16), 16
READ_MIB = (8, 16, 32, 64, 128, 256)  # working sets a cyclic read is timed at: below, near and past the L3
ATTENTION = [(d, n) for d in (64, 128) for n in (128, 512, 2048)]  # (head_dim, prompt tokens) SDPA is timed at


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


def measure_read_gbs(threads: int, mib: int = 256, reps: int = 5) -> float:
    """DRAM read GB/s of a one-row fp32 GEMV over `mib` MiB (decode's access pattern), timed as the engine is."""
    with torch_threads(threads), torch.inference_mode():
        matrix, vector = torch.ones(mib * 2**20 // (4 * 4096), 4096), torch.ones(4096)
        torch.mv(matrix, vector)
        return matrix.nbytes / best_seconds(lambda: torch.mv(matrix, vector), reps, threads) / 1e9


def _roofs(threads: int) -> dict:
    with torch_threads(threads):
        return {"dram_gbs": measure_read_gbs(threads), "gemm_fp32": measure_gemm(torch.float32, 1024, 3),
                "gemm_bf16": measure_gemm(torch.bfloat16, 1024, 3)}


def _layer_calls(layer: torch.nn.Module) -> list[tuple]:
    """(callable, output features, input features) of each linear call one decoder layer makes, fused where the
    engine fuses (a bf16 model's q/k/v and gate/up)."""
    from edgellm.kernels.linear import linear

    attn, mlp = layer.self_attn, layer.mlp
    calls = []
    if attn.qkv is not None:
        calls.append((lambda x, w=attn.qkv: linear(x, *w), attn.qkv[0].shape[0], attn.q_proj.in_features))
    else:
        calls += [(getattr(attn, n), getattr(attn, n).out_features, attn.q_proj.in_features)
                  for n in ("q_proj", "k_proj", "v_proj")]
    calls.append((attn.o_proj, attn.o_proj.out_features, attn.o_proj.in_features))
    if mlp.gate_up is not None:
        calls.append((lambda x, w=mlp.gate_up: linear(x, *w), mlp.gate_up[0].shape[0], mlp.gate_proj.in_features))
    else:
        calls += [(getattr(mlp, n), mlp.gate_proj.out_features, mlp.gate_proj.in_features)
                  for n in ("gate_proj", "up_proj")]
    calls.append((mlp.down_proj, mlp.down_proj.out_features, mlp.down_proj.in_features))
    return calls


@torch.inference_mode()
def time_calls(model: torch.nn.Module, rows: int, threads: int, flush: Callable[[], None],
               reps: int = 3) -> list[tuple]:
    """(output features, input features, seconds per call) of each kind of linear call the decoder layers make, for
    `rows` rows of input: each timed over every layer's call of that kind from a cold cache (best of `reps`)."""
    layers = [_layer_calls(layer) for layer in model.model.layers]
    out = []
    for kind in range(len(layers[0])):
        _, n, k = layers[0][kind]
        x = torch.randn(1, rows, k).to(model.dtype)

        def run(kind: int = kind, x: torch.Tensor = x) -> None:
            for calls in layers:
                calls[kind][0](x)

        run()  # warm-up: Q4_0's lookup copy is made by the first call that runs the table-lookup kernel
        # hundreds of these: a contended one is retried once, not waited out
        out.append((n, k, best_seconds(run, reps, threads, flush, attempts=2) / len(layers)))
    return out


def kernel_rows(fmt: str, hidden: int) -> list[tuple[int, str]]:
    """The row counts to time `fmt` at, each with the kernel edgellm runs there: ROWS plus both sides of every
    crossover below 1024."""
    from edgellm.kernels.linear import native_max_rows
    from edgellm.kernels.select import choose_kernel
    from edgellm.quant.formats import WeightFormat
    from edgellm.quant.qmatmul import VNNI_LINEAR

    def kernel(m: int) -> str:
        if fmt == "bf16":
            return "gemv" if m <= native_max_rows() else "gemm"
        if fmt in DENSE_BYTES:
            return "gemm"
        wf = WeightFormat.gguf(fmt)
        return choose_kernel(8 if wf.kind in VNNI_LINEAR else wf.bits, hidden, hidden, m)

    counts = set(ROWS)
    for a, b in zip(range(1, max(ROWS)), range(2, max(ROWS) + 1), strict=False):
        if kernel(a) != kernel(b):
            counts |= {a, b}
    return [(m, kernel(m)) for m in sorted(counts)]


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """Non-negative least squares by elimination: solve, drop the unknowns that come out negative, solve again."""
    active = list(range(len(rows[0])))
    while True:
        a = torch.tensor([[r[i] for i in active] for r in rows], dtype=torch.float64)
        x = torch.linalg.lstsq(a, torch.tensor(rhs, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1).tolist()
        if all(v >= 0 for v in x) or len(active) == 1:
            out = [0.0] * len(rows[0])
            for i, v in zip(active, x, strict=True):
                out[i] = max(v, 0.0)
            return out
        active = [i for i, v in zip(active, x, strict=True) if v >= 0] or active[:1]


def fit_fused(points: list[list[float]], seconds: list[float], fastest_gbs: float,
              row_s: float | None = None) -> tuple[float, float]:
    """(seconds per weight byte, seconds per output row) of the fused decode step from (bytes, rows) and the seconds
    they took, per model width. `row_s`: the per-row cost already known (from fewer threads), then only the byte
    rate is fitted, on relative error.

    Two widths tell the two costs apart only as far as the timings' noise lets them: a solve that put a step's time
    into its rows read int2 weights at "1000 GB/s", so no stream runs faster than the fastest cached read measured
    (`fastest_gbs`), and at that rate the rows keep what is left. With more threads, the step splits each
    projection's rows among them, so a row's fixed work (sums, scales, store) is done by one: solved afresh from two
    widths, the 2-thread per-row cost came out above the 1-thread one for some format in each of six calibrations
    (a step's noise put into its rows), and the 2-thread rows of a 30-layer model then cost as much as its weights.
    """
    floor = 1 / (fastest_gbs * 1e9)
    if row_s is not None:
        inverse = _solve([[b / v] for (b, _), v in zip(points, seconds, strict=True)],
                         [1 - r * row_s / v for (_, r), v in zip(points, seconds, strict=True)])[0]
        return max(inverse, floor), row_s
    inverse, row_s = _solve(points, seconds)
    if inverse < floor:
        row_s = _solve([[r] for _, r in points], [v - b * floor for (b, _), v in zip(points, seconds, strict=True)])[0]
    return max(inverse, floor), row_s


def fit_linear(calls: list[tuple]) -> dict:
    """Seconds per weight, per output feature, per input feature and per call from (N, K, seconds) of calls of
    many shapes at one row count, fitted on relative error (a tiny call counts as much as a large one)."""
    weight_s, row_s, input_s, call_s = _solve([[n * k / s, n / s, k / s, 1 / s] for n, k, s in calls],
                                              [1.0] * len(calls))
    return {"weight_s": weight_s, "row_s": row_s, "input_s": input_s, "call_s": call_s}


@torch.inference_mode()
def measure_elementwise(threads: int, tokens: int = 256, hidden: int = 1024, intermediate: int = 2816) -> dict:
    """Seconds per activation element (per token and layer: hidden + intermediate) of a prefill's element-wise work:
    SiLU(gate) * up over the intermediate width, two RMS norms and two residual adds over the hidden, per dtype."""
    from edgellm.kernels.decode import rms_norm

    out = {}
    with torch_threads(threads):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            gate, up = (torch.randn(tokens, intermediate, dtype=dtype) for _ in range(2))
            x, w = torch.randn(tokens, hidden, dtype=dtype), torch.ones(hidden, dtype=dtype)

            def run(gate=gate, up=up, x=x, w=w) -> None:
                F.silu(gate) * up
                for _ in range(2):
                    x + rms_norm(x, w, 1e-6)

            run()
            out[name] = best_seconds(run, 3, threads) / (tokens * (hidden + intermediate))
    return out


@torch.inference_mode()
def measure_attention(threads: int, heads: int = 8, kv_heads: int = 2) -> list[dict]:
    """Seconds per head per (query, key) pair of causal SDPA at each ATTENTION point, in bf16."""
    out = []
    with torch_threads(threads):
        for head_dim, n in ATTENTION:
            q = torch.randn(1, heads, n, head_dim, dtype=torch.bfloat16)
            k, v = (torch.randn(1, kv_heads, n, head_dim, dtype=torch.bfloat16) for _ in range(2))

            def run(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> None:
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            run()
            out.append({"head_dim": head_dim, "tokens": n, "pair_s": best_seconds(run, 2, threads)
                        / (heads * n * (n + 1) / 2)})
    return out


class _Sample:
    """One model loaded in one format: its spec, and what it was timed at."""

    def __init__(self, path: Path, dtype: str | None, name: str) -> None:
        self.engine = Engine(path, dtype)
        self.spec = ModelSpec.from_config(config_of(path), name)
        self.times: dict[tuple, float] = {}


def calibrate(threads: list[int], formats: tuple[str, ...] = FORMATS,
              shapes: tuple[dict, dict] = (CALIBRATION_SHAPE, NARROW_SHAPE), work: Path | None = None,
              log=print, moe_shape: dict = MOE_SHAPE, evict: bool = True) -> DeviceProfile:
    """Measure and return this machine's profile at each thread count in `threads` (fp32 and bf16 must be among
    `formats`: the tiny fp32 models give the overheads, the bf16 model's long context the KV rate). `evict`: time
    weights from DRAM (CacheFlush); off, they run from the cache, as models that fit there do (tests' tiny ones)."""
    if not {"fp32", "bf16"} <= set(formats):
        raise ValueError("calibration needs fp32 and bf16 among its formats")
    start = time.perf_counter()
    flush = CacheFlush() if evict else (lambda: None)
    heads = {head_format(f) for f in formats}
    order = sorted(formats, key=lambda f: (f != "fp32", f != "bf16", f not in heads))  # heads' formats first
    with tempfile.TemporaryDirectory(prefix="edgellm-calibrate-", dir=work) as tmp:
        tmp = Path(tmp)
        disk = measure_disk_gbs(tmp)
        roofs = {t: _roofs(t) for t in threads}
        probes = {t: [roofs[t]["dram_gbs"]] for t in threads}
        log(f"roofs: {roofs}, disk {disk:.2f} GB/s")
        attention = {t: measure_attention(t) for t in threads}
        reads = {t: {str(mib): measure_read_gbs(t, mib, max(5, 256 // mib)) for mib in READ_MIB} for t in threads}
        elementwise = {t: measure_elementwise(t) for t in threads}
        bases = {"tiny2": build_random({**TINY_SHAPE, "num_hidden_layers": 2}, tmp / "tiny2"),
                 "tiny8": build_random({**TINY_SHAPE, "num_hidden_layers": 8}, tmp / "tiny8"),
                 "moe": build_random(moe_shape, tmp / "moe"),
                 "wide": build_random(shapes[0], tmp / "calibration"),
                 "narrow": build_random(shapes[1], tmp / "narrow")}
        samples: dict[tuple[str, str], _Sample] = {}
        for fmt in order:
            names = ("tiny2", "tiny8", "wide", "narrow", "moe")
            for name in names:
                path, dtype = checkpoint(bases[name], fmt, tmp)
                sample = samples[name, fmt] = _Sample(path, dtype, name)
                _time_sample(sample, name, fmt, threads, flush)
                del sample.engine  # one model in memory at a time
            for t in threads:
                probes[t].append(measure_read_gbs(t))
            log(f"{fmt}: measured ({time.perf_counter() - start:.0f} s)")
        for t in threads:  # the load during calibration: the median of the probes taken along it
            roofs[t]["dram_gbs"] = statistics.median(probes[t])
    rates: dict[int, ThreadRates] = {}
    for t in sorted(threads):  # the fewest threads first: more threads share out its per-row costs
        rates[t] = _rates(t, order, roofs[t], attention[t], samples, elementwise[t], reads[t],
                          (min(rates), rates[min(rates)]) if rates else None)
    return DeviceProfile(name=cpu_model_name(), kind="measured",
                         source=f"edgellm plan calibrate, {time.strftime('%Y-%m-%d')}",
                         memory_bytes=_memory_bytes(), disk_gbs=disk, threads=rates, cpu_flags=cpu_flags(),
                         extra={"machine": platform.machine(), "roofs": {str(t): r for t, r in roofs.items()},
                                "calibration_seconds": time.perf_counter() - start, "torch": torch.__version__,
                                "clock": "edgellm.plan.measure.best_seconds"})


def _time_sample(sample: _Sample, name: str, fmt: str, threads: list[int], flush: Callable[[], None]) -> None:
    engine, hidden = sample.engine, sample.spec.hidden
    for t in threads:
        with torch_threads(t):
            steps = STEPS if t == 1 else 3 * STEPS  # on a shared host a step no barrier wait slowed is rarer
            if name in ("tiny8", "wide", "narrow"):
                for m, _ in kernel_rows(fmt, hidden):
                    sample.times["linear", t, m] = time_calls(engine.model, m, t, flush, 3 if m < 256 else 2)
            # a step's own small state (the plan, norms, Python's objects) is reused every step, and the cache keeps
            # it even while a real model's weights stream past: the tiny models' fixed costs are timed warm
            tiny = name.startswith("tiny") or name == "moe"
            step_flush = None if tiny else WeightFlush(engine.model) if flush is not None else None
            sample.times["decode", t, 1] = engine.decode_step_s(SHORT, 3 * steps if tiny else steps, t, 1, None,
                                                                step_flush)
            if name in ("tiny2", "tiny8") and fmt == "fp32":  # the batched step's own costs: format-free
                for b in BATCHES:
                    sample.times["decode", t, b] = engine.decode_step_s(SHORT, steps, t, b, None, None)
            if name in ("tiny2", "tiny8") and fmt == "fp32":
                sample.times["prefill", t, TINY_PROMPT] = engine.prefill_s(TINY_PROMPT, 3, t)
            if name == "moe":
                for n in MOE_PROMPTS:
                    sample.times["prefill", t, n] = engine.prefill_s(n, 2, t)
            if name == "wide" and fmt == "bf16":
                sample.times["long", t, 1] = engine.decode_step_s(LONG, steps, t, 1, None, step_flush)


def _rates(t: int, formats: list[str], roofs: dict, attention: list[dict],
           samples: dict[tuple[str, str], _Sample], elementwise: dict, reads: dict[str, float],
           fewer: tuple[int, ThreadRates] | None = None) -> ThreadRates:
    """Solve the timings for the rates, each from what the others leave of a measurement. `fewer`: the rates solved
    at a smaller thread count, whose per-row costs `t` threads share out."""
    fastest = max(reads.values(), default=roofs["dram_gbs"])
    # op-at-a-time linear layers: per weight, per output row, per call, from the three widths at each row count
    linear = {}
    for fmt in formats:
        points = []
        for m, kernel in kernel_rows(fmt, samples["wide", fmt].spec.hidden):
            calls = [c for name in ("tiny8", "wide", "narrow") for c in samples[name, fmt].times["linear", t, m]]
            points.append({"rows": m, "kernel": kernel, **fit_linear(calls)})
        linear[fmt] = points
    rates = ThreadRates(dram_gbs=roofs["dram_gbs"], weight_gbs={}, gemm_gflops={"fp32": roofs["gemm_fp32"],
                                                                                 "bf16": roofs["gemm_bf16"]},
                        attention_gflops=1.0, kv_gbs=1.0, batch_weight_gbs={}, linear=linear, attention=attention,
                        elementwise_s=elementwise, read_gbs_by_mib=reads)

    def residual(name: str, fmt: str, kind: str, n: int) -> float:
        """What a measurement (prefill of n tokens, decode of n sequences) leaves once the parts already known are
        taken off (the unknown ones are still 0 in `rates`)."""
        s = samples[name, fmt]
        if kind == "prefill":
            predicted = total_seconds(measured_prefill_ops(s.spec, fmt, n, rates))
        else:
            kv = KVFormat.parse("fp32" if fmt == "fp32" else "bf16")
            predicted = total_seconds(measured_decode_ops(s.spec, fmt, kv, SHORT, n, rates))
        return s.times[kind, t, n] - predicted

    # the fused step per format: its fixed costs from the tiny models (their few weights do not matter), then the
    # weight rate and per-row cost from the two widths, the heads' formats first
    weight_gbs, row_s, fixed = {}, {}, {}
    for fmt in formats:
        tiny2, tiny8 = samples["tiny2", fmt].times["decode", t, 1], samples["tiny8", fmt].times["decode", t, 1]
        layer0 = max(0.0, (tiny8 - tiny2) / 6)
        fixed[fmt] = {"step_s": max(0.0, tiny8 - 8 * layer0), "layer_s": layer0}
        rates = _with(rates, fixed={k: dict(v) for k, v in fixed.items()})
        if fmt == "fp32":
            rates = _with(rates, step_overhead_s=fixed[fmt]["step_s"], layer_overhead_s=layer0)
        head = head_format(fmt)
        rows, rhs = [], []
        for name in ("wide", "narrow"):
            spec = samples[name, fmt].spec
            groups = linear_groups(spec, fmt)
            nbytes = sum(g.params for g in groups) * bytes_per_weight(fmt)
            out_rows = sum(g.out_rows for g in groups)
            known = fixed[fmt]["step_s"] + spec.layers * fixed[fmt]["layer_s"]
            if head == fmt or head not in weight_gbs:  # a head in a format not calibrated: at this one's rates
                nbytes += spec.table_params * bytes_per_weight(fmt)
                out_rows += spec.vocab
            else:  # the Q8_0 head at Q8_0's rates
                known += spec.table_params * bytes_per_weight(head) / (weight_gbs[head] * 1e9) + spec.vocab * \
                    row_s[head]
            rows.append([nbytes, out_rows])
            rhs.append(samples[name, fmt].times["decode", t, 1] - known)
        inverse, row_s[fmt] = fit_fused(rows, rhs, fastest,
                                        None if fewer is None else fewer[1].weight_row_s[fmt] * fewer[0] / t)
        weight_gbs[fmt] = 1 / inverse / 1e9
        rates = _with(rates, weight_gbs=dict(weight_gbs), weight_row_s=dict(row_s))
    # the fused step's attention: a long context against the short one, per FLOP (its kernel is bound by them)
    wide = samples["wide", "bf16"].spec
    extra = samples["wide", "bf16"].times["long", t, 1] - samples["wide", "bf16"].times["decode", t, 1]
    flops = 4 * wide.layers * wide.heads * wide.head_dim * (LONG - SHORT)
    kv_bytes = wide.kv_bytes_per_token(KVFormat.parse("bf16")) * (LONG - SHORT)
    # no faster than the GEMM roof: a neighbour's slow short step once read 49,545 GFLOP/s off a near-zero difference
    extra = max(extra, flops / 1e9 / roofs["gemm_fp32"])
    rates = _with(rates, attention_gflops=flops / 1e9 / extra, kv_gbs=kv_bytes / 1e9 / extra)
    # batched decode: what the tiny models leave once their linear layers are paid, as a cost per step, per layer and
    # per (layer, sequence), non-negative least squares over both depths and every batch size, relative to each step
    # (solved one difference at a time and clamped, three calibrations read (0, 131, 11), (520, 0, 40) and (0, 0, 16)
    # µs)
    left = [(layers, b, residual(f"tiny{layers}", "fp32", "decode", b),
             samples[f"tiny{layers}", "fp32"].times["decode", t, b]) for layers in (2, 8) for b in BATCHES]
    step, layer, sequence = _solve([[1 / s, layers / s, layers * b / s] for layers, b, _, s in left],
                                   [v / s for _, _, v, s in left])
    rates = _with(rates, sequence_overhead_s=sequence, batch_layer_overhead_s=layer, batch_step_overhead_s=step)
    # prefill: a step and a layer from the tiny models
    p2, p8 = residual("tiny2", "fp32", "prefill", TINY_PROMPT), residual("tiny8", "fp32", "prefill", TINY_PROMPT)
    prefill_layer = max(0.0, (p8 - p2) / 6)
    rates = _with(rates, prefill_layer_s=prefill_layer, prefill_overhead_s=max(0.0, p8 - 8 * prefill_layer))
    # MoE per format: the MoE model's time past what its weights and dense parts cost, per expert it runs (fused
    # decode; op-at-a-time prefill, per expert and per (token, expert) pair routed: from two prompt lengths)
    moe = samples["moe", "bf16"].spec
    for fmt in formats:
        fixed[fmt]["expert_s"] = max(0.0, residual("moe", fmt, "decode", 1)) / (moe.moe_layers * moe.experts_per_token)
        (short, long), left = MOE_PROMPTS, [residual("moe", fmt, "prefill", n) for n in MOE_PROMPTS]
        per_pair = max(0.0, (left[1] - left[0]) / (moe.moe_layers * moe.experts_per_token * (long - short)))
        fixed[fmt]["expert_pair_s"] = per_pair
        fixed[fmt]["expert_op_s"] = max(0.0, left[0] - moe.moe_layers * moe.experts_per_token * short * per_pair) / (
            moe.moe_layers * unique_experts(moe.experts, moe.experts_per_token, short))
    return _with(rates, batch_weight_gbs=dict(weight_gbs), fixed=fixed, expert_overhead_s=fixed["fp32"]["expert_s"],
                 expert_op_s=fixed["fp32"]["expert_op_s"])


def _with(rates: ThreadRates, **changes) -> ThreadRates:
    return replace(rates, **changes)

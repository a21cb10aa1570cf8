"""Device profiles: the rates the cost model divides by, measured here (`edgellm plan calibrate`) or from a datasheet.

A profile holds effective rates, not peaks. A datasheet device gets its rates from peak × a generic efficiency and a
per-kernel launch latency, and says so: the cost model takes each op as bound by compute or memory. A calibrated CPU
also holds what edgellm's own kernels cost as they run here (`ThreadRates.linear` and the rest): the fused batch-1
decode step's weight rate and per-row cost per format, the op-at-a-time linear layers per format at each row count
(the kernel that count selects: table lookup, VNNI, dequantize + GEMM), prefill attention per head size and length,
and the dispatch overheads; the cost model then sums those instead of dividing by roofs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.errors import InvalidRequestError
from edgellm.perf.weights import bytes_per_weight

PROFILE_VERSION = 2


@dataclass(frozen=True)
class ThreadRates:
    """What the device sustains at one thread count (or, for an accelerator, at all)."""

    dram_gbs: float
    weight_gbs: dict[str, float]  # decode: weight bytes per second per format, dequantization included
    gemm_gflops: dict[str, float]  # prefill: GEMM FLOP/s per format (a calibrated CPU: the GEMM roof per dtype)
    attention_gflops: float  # a calibrated CPU: the fused decode step's attention (prefill's is `attention`)
    kv_gbs: float
    batch_weight_gbs: dict[str, float]  # the same in a batched decode step (a CPU runs it op at a time, unfused)
    step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    batch_step_overhead_s: float = 0.0
    batch_layer_overhead_s: float = 0.0
    sequence_overhead_s: float = 0.0  # per sequence per layer of a batched step (its own attention, bookkeeping)
    prefill_overhead_s: float = 0.0
    expert_overhead_s: float = 0.0  # per expert an MoE layer runs (its own small GEMVs and bookkeeping)
    # measured kernels (a calibrated CPU; empty for a datasheet device), see the module docstring
    weight_row_s: dict[str, float] = field(default_factory=dict)  # fused step: seconds per output row, per format
    # op at a time: per format, points {"rows", "kernel", "weight_s", "row_s", "input_s", "call_s"}
    linear: dict[str, list[dict]] = field(default_factory=dict)
    attention: list[dict] = field(default_factory=list)  # prefill: {"head_dim", "tokens", "pair_s"}
    elementwise_s: dict[str, float] = field(default_factory=dict)  # prefill: per activation element, per dtype
    prefill_layer_s: float = 0.0  # prefill: per layer (norms, RoPE, cache writes: their dispatch)
    expert_op_s: float = 0.0  # op at a time: per expert an MoE layer runs, besides its linear layers
    # per format, where it differs from the fields above: "step_s", "layer_s" (fused step), "expert_s" (per expert in
    # the fused step), "expert_op_s" (per expert op at a time), "expert_pair_s" (per routed (token, expert) pair, op
    # at a time)
    fixed: dict[str, dict[str, float]] = field(default_factory=dict)
    # cyclic read GB/s by working set in MiB (keys as strings, for JSON): decode reads the same bytes every step, and
    # of a working set near the last-level cache's size part stays cached between steps
    read_gbs_by_mib: dict[str, float] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """True where the cost model sums measured kernel times rather than dividing by roofs."""
        return bool(self.linear)

    def weight_gbs_for(self, fmt: str, batch: int = 1) -> float:
        table = self.weight_gbs if batch == 1 else self.batch_weight_gbs
        return table[_nearest(fmt, table)]

    def gemm_gflops_for(self, fmt: str) -> float:
        return self.gemm_gflops[_nearest(fmt, self.gemm_gflops)]

    def stream_speedup(self, nbytes: float) -> float:
        """How much faster than from DRAM a step reads `nbytes` it read the step before too: the measured cyclic read
        rate at that working set (interpolated in log size) over the rate at the largest one measured; 1 without a
        table, past its largest size, or where the table is noisier than the effect."""
        if not self.read_gbs_by_mib:
            return 1.0
        points = sorted((float(mib) * 2**20, gbs) for mib, gbs in self.read_gbs_by_mib.items())
        if nbytes >= points[-1][0]:
            return 1.0
        if nbytes <= points[0][0]:
            return max(1.0, points[0][1] / points[-1][1])
        hi = next(i for i, (size, _) in enumerate(points) if size >= nbytes)
        (x0, y0), (x1, y1) = points[hi - 1], points[hi]
        return max(1.0, (y0 + (y1 - y0) * math.log(nbytes / x0) / math.log(x1 / x0)) / points[-1][1])

    def fixed_s(self, fmt: str, key: str, default: float) -> float:
        """A fixed cost of `fmt` (see `fixed`), else `default`."""
        return self.fixed[_nearest(fmt, self.fixed)].get(key, default) if self.fixed else default

    def row_s_for(self, fmt: str) -> float:
        return self.weight_row_s[_nearest(fmt, self.weight_row_s)] if self.weight_row_s else 0.0

    def linear_s(self, fmt: str, rows: int, params: float, out_rows: float, in_width: float, calls: float) -> float:
        """Seconds op-at-a-time linear layers of `params` weights in `fmt`, `out_rows` output and `in_width` input
        features and `calls` calls in all take for `rows` rows of input, as measured for the kernel that many rows
        selects (the input term: preparing x, e.g. the lookup tables a table-lookup kernel builds per row)."""
        points = self.linear[_nearest(fmt, self.linear)]
        kernel = next((p["kernel"] for p in reversed(points) if p["rows"] <= rows), points[0]["kernel"])
        same = [p for p in points if p["kernel"] == kernel]
        below = [p for p in same if p["rows"] <= rows]
        above = [p for p in same if p["rows"] > rows]
        # time is linear in rows within one kernel: interpolate between the nearest two points of it, or extend
        # the last two (a kernel measured at one count only is taken as flat)
        if below and above:
            lo, hi = below[-1], above[0]
        elif len(same) >= 2:
            lo, hi = (same[-2], same[-1]) if below else (same[0], same[1])
        else:
            lo = hi = same[0]
        share = 0.0 if hi["rows"] == lo["rows"] else (rows - lo["rows"]) / (hi["rows"] - lo["rows"])

        def at(key: str) -> float:
            return max(0.0, lo.get(key, 0.0) + share * (hi.get(key, 0.0) - lo.get(key, 0.0)))

        return params * at("weight_s") + out_rows * at("row_s") + in_width * at("input_s") + calls * at("call_s")

    def attention_s(self, head_dim: int, tokens: int, pairs: float) -> float:
        """Seconds causal prefill attention over `pairs` (query, key) pairs per head costs at this head size and
        prompt length: the measured per-pair cost, linear in head size, interpolated in log length."""
        def per_pair(points: list[dict]) -> float:
            points = sorted(points, key=lambda p: p["tokens"])
            if tokens <= points[0]["tokens"]:
                return points[0]["pair_s"]
            if tokens >= points[-1]["tokens"]:
                return points[-1]["pair_s"]
            hi = next(i for i, p in enumerate(points) if p["tokens"] >= tokens)
            lo = points[hi - 1]
            x = math.log(tokens / lo["tokens"]) / math.log(points[hi]["tokens"] / lo["tokens"])
            return lo["pair_s"] + x * (points[hi]["pair_s"] - lo["pair_s"])

        dims = sorted({p["head_dim"] for p in self.attention})
        by_dim = {d: per_pair([p for p in self.attention if p["head_dim"] == d]) for d in dims}
        if len(dims) == 1:
            cost = by_dim[dims[0]] * head_dim / dims[0]
        else:
            lo, hi = dims[0], dims[-1]
            cost = by_dim[lo] + (head_dim - lo) * (by_dim[hi] - by_dim[lo]) / (hi - lo)
        return pairs * max(cost, 0.0)


def _nearest(fmt: str, table: dict[str, float]) -> str:
    """`fmt` itself, else the measured format closest in bits per weight (fp16 reads as bf16: same bytes, same
    kernels), else "*" (a datasheet device's one rate for every format)."""
    if fmt in table:
        return fmt
    if "*" in table:
        return "*"
    target = bytes_per_weight(fmt)
    return min(table, key=lambda name: (abs(bytes_per_weight(name) - target), name))


@dataclass
class DeviceProfile:
    """A device: where its figures come from, its memory tiers, and its rates per thread count."""

    name: str
    kind: str  # "measured", "datasheet" or "default"
    source: str
    memory_bytes: float
    disk_gbs: float
    threads: dict[int, ThreadRates]
    power_w: float | None = None
    host_memory_bytes: float = 0.0  # an accelerator's second tier (host RAM over the link)
    host_link_gbs: float = 0.0
    cpu_flags: str = ""
    extra: dict = field(default_factory=dict)

    def rates(self, threads: int | None) -> ThreadRates:
        """The rates at `threads`; an accelerator (one entry, key 0) ignores threads; else a one-line error."""
        if 0 in self.threads:
            return self.threads[0]
        if threads is None:
            return self.threads[max(self.threads)]
        if threads not in self.threads:
            have = ", ".join(str(t) for t in sorted(self.threads))
            raise InvalidRequestError(f"device profile {self.name!r} has rates for {have} thread(s), not {threads}; "
                                      f"pass --threads {have.split(', ')[-1]} or recalibrate with --threads {threads}")
        return self.threads[threads]

    def to_json(self) -> dict:
        out = asdict(self)
        out["threads"] = {str(t): asdict(r) for t, r in self.threads.items()}
        return {"version": PROFILE_VERSION, **out}

    @classmethod
    def from_json(cls, data: dict) -> DeviceProfile:
        try:
            fields = {k: v for k, v in data.items() if k != "version"}
            fields["threads"] = {int(t): ThreadRates(**r) for t, r in data["threads"].items()}
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"device profile is missing or mangles a field ({e})") from None

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


def default_profile_path() -> Path:
    """Where `plan calibrate` writes and `plan` reads this machine's profile (next to the kernel cache)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "edgellm" / "device-profile.json"


def load_profile(path: str | Path) -> DeviceProfile:
    """A profile file (from `plan calibrate` or written by hand), or a one-line error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"cannot read device profile {path} ({e}); run `edgellm plan calibrate`") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"device profile {path} is not a JSON object")
    return DeviceProfile.from_json(data)


def datasheet_device(name: str, source: str, memory_gb: float, bandwidth_gbs: float, peak_tflops: float,
                     launch_us: float, ops_per_layer: int = 16, power_w: float | None = None,
                     mem_efficiency: float = 0.75, compute_efficiency: float = 0.5, host_memory_gb: float = 0.0,
                     host_link_gbs: float = 0.0, kind: str = "datasheet", **extra) -> DeviceProfile:
    """An accelerator from its datasheet: generic efficiencies (75% of peak bandwidth, 50% of peak FLOPs, the same
    for every format: its kernels dequantize in registers) and one launch latency per kernel, ops_per_layer kernels
    per layer (a llama.cpp graph launches about 16)."""
    layer_s, step_s = ops_per_layer * launch_us * 1e-6, 4 * launch_us * 1e-6
    rates = ThreadRates(dram_gbs=bandwidth_gbs, weight_gbs={"*": bandwidth_gbs * mem_efficiency},
                        gemm_gflops={"*": peak_tflops * 1e3 * compute_efficiency},
                        attention_gflops=peak_tflops * 1e3 * compute_efficiency / 2,
                        kv_gbs=bandwidth_gbs * mem_efficiency, batch_weight_gbs={"*": bandwidth_gbs * mem_efficiency},
                        step_overhead_s=step_s, layer_overhead_s=layer_s, batch_step_overhead_s=step_s,
                        batch_layer_overhead_s=layer_s, prefill_overhead_s=step_s + layer_s)
    return DeviceProfile(name=name, kind=kind, source=source, memory_bytes=memory_gb * 1e9, disk_gbs=5.0,
                         threads={0: rates}, power_w=power_w, host_memory_bytes=host_memory_gb * 1e9,
                         host_link_gbs=host_link_gbs, extra={"peak_bandwidth_gbs": bandwidth_gbs,
                                                             "peak_tflops": peak_tflops, **extra})


def default_cpu_profile() -> DeviceProfile:
    """Rates of a typical 2-core AVX-512 cloud VM (edgellm's README figures), for `plan` before any calibration:
    labelled as a default so no one mistakes it for this machine."""
    rates = ThreadRates(dram_gbs=20.0, weight_gbs={"fp32": 8.0, "bf16": 9.0, "q8_0": 8.0, "q4_0": 6.0,
                                                   "int4-g64": 5.0, "int2-g64": 4.0},
                        gemm_gflops={"fp32": 120.0, "bf16": 120.0, "q8_0": 100.0, "q4_0": 60.0, "int4-g64": 60.0,
                                     "int2-g64": 50.0},
                        attention_gflops=30.0, kv_gbs=8.0, batch_weight_gbs={"fp32": 6.0, "bf16": 6.0, "q8_0": 5.0,
                                                                              "q4_0": 4.0, "int4-g64": 3.0,
                                                                              "int2-g64": 3.0},
                        step_overhead_s=5e-4, layer_overhead_s=5e-5, batch_step_overhead_s=1e-3,
                        batch_layer_overhead_s=3e-4, sequence_overhead_s=5e-5, prefill_overhead_s=2e-3)
    return DeviceProfile(name="default CPU (uncalibrated)", kind="default",
                         source="edgellm README figures; run `edgellm plan calibrate` to measure this machine",
                         memory_bytes=16 * 2**30, disk_gbs=1.0, threads={0: rates})

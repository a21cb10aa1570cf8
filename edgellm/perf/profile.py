"""Device profiles: the rates the cost model divides by, measured here (`edgellm plan calibrate`) or from a datasheet.

A profile holds effective rates, not peaks: the GB/s a decode step reaches per weight format (its dequantization
inside), the GFLOP/s a prefill reaches per format, and the fixed cost of dispatching a step and a layer. A
datasheet device gets its rates from peak × a generic efficiency and a per-kernel launch latency, and says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.errors import InvalidRequestError
from edgellm.perf.weights import bytes_per_weight

PROFILE_VERSION = 1


@dataclass(frozen=True)
class ThreadRates:
    """What the device sustains at one thread count (or, for an accelerator, at all)."""

    dram_gbs: float
    weight_gbs: dict[str, float]  # decode: weight bytes per second per format, dequantization included
    gemm_gflops: dict[str, float]  # prefill: GEMM FLOP/s per format, dequantization included
    attention_gflops: float
    kv_gbs: float
    batch_weight_gbs: dict[str, float]  # the same in a batched decode step (a CPU runs it op at a time, unfused)
    step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    batch_step_overhead_s: float = 0.0
    batch_layer_overhead_s: float = 0.0
    sequence_overhead_s: float = 0.0  # per sequence per layer of a batched step (its own attention, bookkeeping)
    prefill_overhead_s: float = 0.0
    expert_overhead_s: float = 0.0  # per expert an MoE layer runs (its own small GEMVs and bookkeeping)

    def weight_gbs_for(self, fmt: str, batch: int = 1) -> float:
        table = self.weight_gbs if batch == 1 else self.batch_weight_gbs
        return table[_nearest(fmt, table)]

    def gemm_gflops_for(self, fmt: str) -> float:
        return self.gemm_gflops[_nearest(fmt, self.gemm_gflops)]


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

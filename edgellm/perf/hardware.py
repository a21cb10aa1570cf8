"""Measure this machine's memory read bandwidth and GEMM peaks: the two roofs of LLM decode and prefill.

Figures are measured rather than taken from spec sheets because what matters is what torch reaches on this
machine, with these threads, today (a busy neighbour or a VM's memory limits both show up here).
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.errors import InvalidRequestError

if TYPE_CHECKING:  # torch is imported where a measurement runs: `edgellm plan` reads sizes and core counts only
    import torch

SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
         "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
READ_BUFFER_MIB = 512  # far above any L3 (48 MB here), so every rep streams from DRAM
GEMM_SIZE = 2048  # large enough that packing overheads vanish, small enough to take < 1 s per rep
REPS = 5


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5g' or a plain byte count as an integer."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise InvalidRequestError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MB or 1073741824")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class HardwareProfile:
    """What the CPU sustains: DRAM read GB/s (decode's roof) and GEMM GFLOP/s per dtype (prefill's roof)."""

    cpu: str
    threads: int
    native_bf16: bool
    mem_read_gbs: float
    gemm_gflops: dict[str, float]

    def peak_gflops(self, dtype: torch.dtype) -> float:
        """Measured GEMM peak for `dtype`; KeyError if it was not measured."""
        return self.gemm_gflops[dtype_name(dtype)]

    def to_json(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else whatever `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores(cpuinfo: str | None = None, allowed: Iterable[int] | None = None) -> int:
    """Physical cores this process may run on: distinct (physical id, core id) pairs of its allowed CPUs.

    Decode streams weights, and a core's hyperthreads share its load units, so llama.cpp defaults to one thread
    per physical core. `cpuinfo` (the text of /proc/cpuinfo) and `allowed` (CPU numbers; default: this process's
    affinity) are parameters for tests. Without core ids (ARM, some VMs) every allowed CPU counts as a core.
    """
    if allowed is None:
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    allowed = set(allowed)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    cores = set()
    for block in cpuinfo.split("\n\n"):
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
        if fields.get("processor", "").isdigit() and "core id" in fields and int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or len(allowed) or 1


def _best_seconds(fn: Callable[[], object], reps: int) -> float:
    """Fastest of `reps` timed calls after one untimed warm-up (first calls pay for page faults and JIT)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_read_bandwidth(mib: int = READ_BUFFER_MIB, reps: int = REPS) -> float:
    """GB/s of a one-row fp32 GEMV over a buffer much larger than L3: the access pattern of decode."""
    import torch

    with torch.inference_mode():
        matrix = torch.ones(mib * 2**20 // (4 * 4096), 4096)
        vector = torch.ones(4096)
        return matrix.nbytes / _best_seconds(lambda: torch.mv(matrix, vector), reps) / 1e9


def measure_gemm(dtype: torch.dtype, n: int = GEMM_SIZE, reps: int = REPS) -> float:
    """GFLOP/s of an n×n×n matmul in `dtype` (2n³ FLOPs)."""
    import torch

    with torch.inference_mode():
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), reps) / 1e9


@cache
def measure_hardware() -> HardwareProfile:
    """Measure once per process (a few seconds) and reuse: the machine does not change under one benchmark."""
    import torch

    from edgellm.kernels.native import cpu_has_native_bf16

    return HardwareProfile(
        cpu=cpu_model_name(),
        threads=torch.get_num_threads(),
        native_bf16=cpu_has_native_bf16(),
        mem_read_gbs=measure_read_bandwidth(),
        gemm_gflops={dtype_name(d): measure_gemm(d) for d in (torch.float32, torch.bfloat16)},
    )

"""Peak tensor memory of a call, from torch.profiler allocator events: a measuring tool, so it lives with benchmarks."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def measure_peak_bytes(fn: Callable[[], object]) -> int:
    """Largest amount of tensor memory `fn` holds allocated at once (CPU allocator events, via torch.profiler).

    Shows that `attend` over a quantized cache never allocates what materialising its K/V would.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return max(itertools.accumulate((e.self_cpu_memory_usage for e in events), initial=0))

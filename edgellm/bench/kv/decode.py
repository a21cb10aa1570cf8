"""Decode step over a whole model's KV caches, per format: attention alone (every layer in turn) and the full step.

Caches are filled with random K/V (no prefill), so a 16K context costs seconds to set up. Every layer runs in
sequence, so a layer's cache is out of the CPU's caches again when its turn comes, as in a real step (one layer
timed alone keeps its fp16 cache in L2 and flatters it). Formats alternate rep by rep and the median is kept, so a
shared machine's drift hits every format alike.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from edgellm.bench.kv.common import Subject, held_bytes, random_cache, random_ids
from edgellm.kv.formats import KVFormat


def _attend_all(layers: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> float:
    """Seconds for one decode step's attention in every layer (the new token stored, then forgotten again)."""
    t0 = time.perf_counter()
    for layer in layers:
        layer.attend(q, k, v, None, scale)
    elapsed = time.perf_counter() - t0
    for layer in layers:
        layer.trim(1)
    return elapsed


def _step(model: torch.nn.Module, layers: list, token: torch.Tensor) -> float:
    """Seconds for one whole decode step of the model (the new token forgotten again)."""
    t0 = time.perf_counter()
    int(model(token, layers, last_only=True)[0, -1].argmax())
    elapsed = time.perf_counter() - t0
    for layer in layers:
        layer.trim(1)
    return elapsed


@torch.no_grad()
def measure(subjects: list[tuple[Subject, list[int]]], formats: list[KVFormat], reps: int, seed: int) -> list[dict]:
    """One row per (context, format): median attention and step times over `reps` alternated reps (one warm-up)."""
    rows = []
    for subject, contexts in subjects:
        model, args = subject.model, subject.model.args
        dtype = model.dtype
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, args.num_attention_heads, 1, args.head_dim, generator=g).to(dtype)
        k, v = (torch.randn(1, args.num_key_value_heads, 1, args.head_dim, generator=g).to(dtype) for _ in range(2))
        for n in contexts:
            print(f"[bench kv] decode {n} tokens on {subject.name}", file=sys.stderr)
            ids = random_ids(args.vocab_size, n + 1, seed)
            caches = {fmt: random_cache(model, fmt, ids[:n], seed, spare=1) for fmt in formats}
            token = torch.tensor([[ids[n]]])
            attention: dict[KVFormat, list[float]] = {fmt: [] for fmt in formats}
            step: dict[KVFormat, list[float]] = {fmt: [] for fmt in formats}
            for rep in range(reps + 1):
                for fmt in formats:
                    a = _attend_all(caches[fmt].layers, q, k, v, args.head_dim**-0.5)
                    s = _step(model, caches[fmt].layers, token)
                    if rep:  # the first rep warms allocations and the CPU's caches up
                        attention[fmt].append(a)
                        step[fmt].append(s)
            base = statistics.median(attention[formats[0]]), statistics.median(step[formats[0]])
            for fmt in formats:
                att, st = statistics.median(attention[fmt]), statistics.median(step[fmt])
                held = held_bytes(caches[fmt])
                rows.append({"context": n, "format": str(fmt), "model": subject.name, "layers": len(caches[fmt].layers),
                             "attention_s": att, "step_s": st, "baseline": str(formats[0]),
                             "attention_vs_baseline": att / base[0], "step_vs_baseline": st / base[1],
                             "cache_bytes": held,
                             "attention_gb_s": held / att / 1e9,
                             "reps_s": {"attention": attention[fmt], "step": step[fmt]}})
    return sorted(rows, key=lambda r: r["context"])

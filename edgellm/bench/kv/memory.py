"""Memory: peak tensor memory of one decode step over a long cache, next to the cache's own size."""

from __future__ import annotations

import torch

from edgellm.bench.kv.common import Subject, held_bytes, random_cache, random_ids
from edgellm.bench.memory import measure_peak_bytes
from edgellm.kv.formats import KVFormat


@torch.no_grad()
def measure(subject: Subject, formats: list[KVFormat], tokens: int, seed: int) -> dict:
    """Peak tensor memory allocated by one decode step over `tokens` cached tokens, next to the cache's size."""
    model = subject.model
    ids = random_ids(model.args.vocab_size, tokens, seed)
    step = torch.tensor([[ids[-1]]])
    rows = []
    for fmt in formats:
        cache = random_cache(model, fmt, ids, seed, spare=1)
        peak = measure_peak_bytes(lambda cache=cache: model(step, cache.layers, last_only=True))
        held = held_bytes(cache)
        rows.append({"format": str(fmt), "cache_bytes": held, "decode_peak_bytes": peak,
                     "peak_over_cache": peak / held})
    return {"model": subject.name, "context": tokens, "rows": rows}

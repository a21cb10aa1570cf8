"""Capacity: bytes per token (formula, held tensors, saved file) and how many agents fit in a memory budget."""

from __future__ import annotations

from pathlib import Path

from edgellm.bench.kv.common import Subject, held_bytes, random_cache, random_ids
from edgellm.kv.formats import KVFormat
from edgellm.kv.persist import save_memory


def measure(subject: Subject, formats: list[KVFormat], tokens: int, budget: int, workdir: Path, seed: int) -> dict:
    """Bytes per token (formula, held tensors, saved file) and how many `tokens`-token agents fit in `budget`."""
    model = subject.model
    ids = random_ids(model.args.vocab_size, tokens, seed)
    fp16_agents = budget // int(KVFormat("fp16").bytes_per_token(model.args) * tokens)
    rows = []
    for fmt in formats:
        cache = random_cache(model, fmt, ids, seed)
        held = held_bytes(cache)
        path = save_memory(workdir / f"capacity-{fmt}.safetensors", cache, model, subject.tokenizer.fingerprint)
        file_bytes = path.stat().st_size
        path.unlink()
        agents = budget // held
        rows.append({"format": str(fmt), "bytes_per_token": fmt.bytes_per_token(model.args),
                     "held_bytes_per_token": held / tokens, "file_bytes_per_token": file_bytes / tokens,
                     "agent_bytes": held, "agents": agents,
                     "agents_vs_fp16": agents / fp16_agents if fp16_agents else None})
    return {"model": subject.name, "agent_tokens": tokens, "budget_bytes": budget, "fp16_agents": fp16_agents,
            "rows": rows}

"""Batch: aggregate greedy decode speed of N live agents in one batch vs one after another, outputs compared."""

from __future__ import annotations

import copy
import time

from edgellm.bench.kv.common import Subject, random_ids
from edgellm.generate import batch_generate, generate
from edgellm.kv.formats import KVFormat
from edgellm.kv.prompt_cache import PromptCache
from edgellm.runner import prefill_tokens


def measure(subject: Subject, fmt: KVFormat, sizes: list[int], longest: int, steps: int, seed: int) -> dict:
    """Aggregate greedy decode tok/s of N live agents with different contexts: one batch vs one after another."""
    model, tokenizer = subject.model, subject.tokenizer
    most = max(sizes)
    prompts = [random_ids(model.args.vocab_size, max(2, longest * (i + 1) // most), seed + 1 + i)
               for i in range(most)]
    generate(model, tokenizer, prompts[0][:64], 4, prompt_cache=PromptCache(model, 68, fmt))  # warm-up
    rows = []
    for n in sorted(set(sizes)):
        agents = prompts[:n]
        caches = [PromptCache(model, len(p) + steps, fmt) for p in agents]
        for p, cache in zip(agents, caches, strict=True):
            prefill_tokens(model, p[:-1], cache)  # live agents: only each one's newest token is left to prefill
        copies = copy.deepcopy(caches)
        t0 = time.perf_counter()
        batched = batch_generate(model, tokenizer, agents, steps, prompt_caches=caches)
        t1 = time.perf_counter()
        alone = [generate(model, tokenizer, p, steps, prompt_cache=c) for p, c in zip(agents, copies, strict=True)]
        t2 = time.perf_counter()
        tokens = sum(len(r.tokens) for r in batched)
        rows.append({"agents": n, "contexts": [len(p) for p in agents], "tokens": tokens,
                     "batched_s": t1 - t0, "sequential_s": t2 - t1, "batched_tok_s": tokens / (t1 - t0),
                     "sequential_tok_s": sum(len(r.tokens) for r in alone) / (t2 - t1),
                     "speedup": (t2 - t1) / (t1 - t0),
                     "outputs_equal": [r.tokens for r in batched] == [r.tokens for r in alone]})
    return {"model": subject.name, "format": str(fmt), "tokens_per_agent": steps, "rows": rows}

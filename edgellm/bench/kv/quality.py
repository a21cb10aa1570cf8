"""Quality: perplexity, KL divergence and top-1 agreement of each KV format vs a dense cache, on held-out text."""

from __future__ import annotations

import math

import torch

from edgellm.bench.kv.common import Subject
from edgellm.kv.formats import KVFormat
from edgellm.kv.prompt_cache import PromptCache
from edgellm.perf.hardware import dtype_name
from edgellm.tokenizer import Tokenizer

QUALITY_CHUNK = 256  # tokens per forward pass, so later chunks attend to an already quantized past


def heldout_ids(tokenizer: Tokenizer, tokens: int) -> list[int]:
    """The first `tokens` ids of the held-out stdlib files, packed as training packs them (BOS … EOS per file).

    EOS is the tokenizer's lowest EOS id, the end-of-text token in the common vocabularies.
    """
    from edgellm.train.corpus import load_corpus, token_stream

    corpus = load_corpus()
    stream = token_stream(corpus.read(corpus.heldout), lambda texts: [tokenizer.encode(t) for t in texts],
                          min(tokenizer.eos_token_ids, default=0))
    return stream[:tokens].tolist()


@torch.no_grad()
def measure(subject: Subject, formats: list[KVFormat], tokens: int) -> dict:
    """Perplexity, KL divergence and top-1 agreement of each format vs a dense cache in the model's dtype.

    Text is fed QUALITY_CHUNK tokens at a time, in segments of up to the model's window, every cache in lockstep,
    so each chunk attends to the past exactly as that format holds it.
    """
    model = subject.model
    ids = heldout_ids(subject.tokenizer, tokens)
    span = min(len(ids), model.args.max_position_embeddings)
    names = {"reference": None, **{str(f): f for f in formats}}
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0} for name in names}
    scored = 0
    for s0 in range(0, len(ids), span):
        segment = ids[s0:s0 + span]
        caches = {name: PromptCache(model, len(segment), fmt) for name, fmt in names.items()}
        for c0 in range(0, len(segment) - 1, QUALITY_CHUNK):
            x = torch.tensor([segment[c0:c0 + QUALITY_CHUNK]])
            target = torch.tensor(segment[c0 + 1:c0 + QUALITY_CHUNK + 1]).unsqueeze(1)
            ref = None
            for name, cache in caches.items():
                logp = model(x, cache.layers)[0, :len(target)].float().log_softmax(-1)
                ref = logp if ref is None else ref
                sums[name]["nll"] -= logp.gather(1, target).sum().item()
                sums[name]["kl"] += (ref.exp() * (ref - logp)).sum().item()
                sums[name]["agree"] += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
            scored += len(target)
    ref_ppl = math.exp(sums["reference"]["nll"] / scored)
    rows = []
    for name in names:
        ppl = math.exp(sums[name]["nll"] / scored)
        rows.append({"format": name, "perplexity": ppl, "ppl_delta_pct": 100 * (ppl / ref_ppl - 1),
                     "mean_kl": sums[name]["kl"] / scored, "top1_agreement_pct": 100 * sums[name]["agree"] / scored})
    return {"model": subject.name, "reference": f"dense {dtype_name(model.dtype)}",
            "tokens": len(ids), "scored_tokens": scored, "segment_tokens": span, "chunk_tokens": QUALITY_CHUNK,
            "text": "held-out stdlib files (edgellm.train.corpus)", "rows": rows}

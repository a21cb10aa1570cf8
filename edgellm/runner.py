"""The model runner: the only forward loops. `prefill` runs prompts (chunked, under a token budget), `decode` runs
one batched step for sequences past their prefill, `speculative_decode` checks drafted tokens in one pass; each
hands its logits to `Sequence.advance`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgellm.errors import InvalidRequestError
from edgellm.kv.batch import batch_layers
from edgellm.kv.prompt_cache import PromptCache
from edgellm.models.lora import select
from edgellm.sampling import TokenLogprob, token_logprobs
from edgellm.sequence import Sequence, State, StepOutput

if TYPE_CHECKING:
    from edgellm.speculative import Proposer

PREFILL_CHUNK = 2048  # bounds attention scratch memory on long prompts


@torch.no_grad()
def prefill_tokens(model: nn.Module, tokens: list[int], cache: PromptCache, chunk: int = PREFILL_CHUNK,
                   adapter: str | None = None) -> torch.Tensor:
    """Run `tokens` through the model into `cache`, `chunk` at a time, with the LoRA `adapter` if one is named;
    returns the last position's logits (vocab,)."""
    if not tokens:
        raise InvalidRequestError("nothing to prefill: the prompt adds no token past the cached ones")
    logits = None
    for start in range(0, len(tokens), chunk):
        piece = tokens[start:start + chunk]
        with select(model, [adapter]):
            logits = model(torch.tensor([piece], dtype=torch.long), cache.layers, last_only=True)
        cache.tokens.extend(piece)
    return logits[0, -1]


@torch.no_grad()
def score(model: nn.Module, tokens: list[int], top: int, chunk: int = PREFILL_CHUNK,
          adapter: str | None = None) -> list[TokenLogprob]:
    """Logprobs of `tokens[1:]`, each given the tokens before it (echo): a forward of its own, in a fresh cache,
    so every token is scored even when a cache holds the prefix; only a chunk's logits are held at a time."""
    cache = PromptCache(model, capacity=len(tokens))
    scored: list[TokenLogprob] = []
    last = None  # the previous chunk's last row, which scores this chunk's first token
    for start in range(0, len(tokens), chunk):
        piece = tokens[start:start + chunk]
        with select(model, [adapter]):
            logits = model(torch.tensor([piece], dtype=torch.long), cache.layers)[0]
        cache.tokens.extend(piece)
        rows = logits[:-1] if last is None else torch.cat([last, logits[:-1]])
        scored += token_logprobs(rows, tokens[max(start, 1):start + len(piece)], top)
        last = logits[-1:]
    return scored


@torch.no_grad()
def prefill(model: nn.Module, sequences: list[Sequence], token_budget: int | None = None,
            chunk: int = PREFILL_CHUNK) -> list[tuple[Sequence, StepOutput]]:
    """Prefill waiting sequences in order, at most `token_budget` tokens in all (a long prompt resumes next call).

    A sequence whose prompt is done samples its first token; returns those (sequence, output) pairs.
    """
    budget = math.inf if token_budget is None else token_budget
    done = []
    for seq in sequences:
        if budget <= 0:
            break
        if seq.state is State.WAITING:
            seq.begin()
        if seq.state is not State.PREFILL:
            continue
        if seq.kv_predictor is not None and len(seq.pending) > 1:
            _predict(model, seq)
        piece = seq.pending[:int(min(budget, len(seq.pending)))]
        logits = prefill_tokens(model, piece, seq.cache, chunk, seq.adapter)
        seq.pending = seq.pending[len(piece):]
        budget -= len(piece)
        if not seq.pending:
            if seq.speculator is not None:
                seq.speculator.begin(seq.ids)
            done.append((seq, seq.advance(logits)))
    return done


def _predict(model: nn.Module, seq: Sequence) -> None:
    """Fill the cache with predicted K/V for every pending prompt token but the last, in one go: the aux pass
    costs a fraction of a base prefill, so it is not split under the budget."""
    start = len(seq.cache.tokens)
    aux_cache = getattr(seq.speculator.proposer, "cache", None) if seq.speculator and seq.speculator.drafts_with_aux \
        else None  # speculating with the aux: its prompt cache is kept for drafting
    seq.kv_predictor.prefill(model, seq.ids[:-1], seq.cache, start=start, aux_cache=aux_cache)
    seq.predicted += len(seq.cache.tokens) - start
    seq.pending = seq.ids[len(seq.cache.tokens):]


@torch.no_grad()
def decode(model: nn.Module, sequences: list[Sequence]) -> list[StepOutput]:
    """One token for each sequence, in one forward pass: linear layers run once for the batch, attention per
    sequence over its own cache (one sequence uses its cache directly)."""
    tokens = torch.tensor([[seq.last_token] for seq in sequences])
    if len(sequences) == 1:
        layers = sequences[0].cache.layers
    else:
        layers = batch_layers([seq.cache.layers for seq in sequences], model.args.sliding_window)
    with select(model, [seq.adapter for seq in sequences]):  # each row through its own adapter
        logits = model(tokens, layers, last_only=True)[:, -1]
    outputs = []
    for seq, row in zip(sequences, logits, strict=True):
        seq.cache.tokens.append(seq.last_token)
        outputs.append(seq.advance(row))
    return outputs


@torch.no_grad()
def speculative_decode(model: nn.Module, seq: Sequence, proposer: Proposer, k: int) -> list[StepOutput]:
    """One to k + 1 tokens for `seq` from one forward pass over its last token and up to `k` proposed ones.

    Each position's logits go through `Sequence.advance` in order (so EOS, stop strings, the length limit and
    penalties act exactly as in `decode`), told the draft for that position and, for a proposer that sampled it,
    the distribution q it came from: greedy keeps it when it is the argmax, sampling keeps it with probability
    min(1, p/q) (`sampling.make_sampler`), so either way the output has plain decoding's distribution. The first
    token that differs from its draft is the model's own pick, so it is kept and the step ends; when every draft
    is kept the last position adds a token of its own. The cache then forgets the rejected positions.
    """
    room = seq.max_tokens - len(seq.generated) - 1  # the step's own token always fits; drafts only in what is left
    draft = proposer.propose(seq.ids + seq.generated, min(k, room)) if room > 0 and k > 0 else []
    if not draft:
        return decode(model, [seq])
    probs = getattr(proposer, "probs", None)
    tokens = [seq.last_token, *draft]
    with select(model, [seq.adapter]):
        logits = model(torch.tensor([tokens]), seq.cache.layers)[0]
    outputs = []
    for i, row in enumerate(logits):
        seq.cache.tokens.append(tokens[i])
        guess = (draft[i], None if probs is None else probs[i]) if i < len(draft) else (None, None)
        outputs.append(seq.advance(row, *guess))
        if seq.finished or i == len(draft) or outputs[-1].token != draft[i]:
            break
    rejected = len(tokens) - len(outputs)
    if rejected:
        for layer in seq.cache.layers:
            layer.trim(rejected)
    seq.drafted += len(draft)
    seq.verify_steps += 1
    seq.accepted += sum(out.token == guess for out, guess in zip(outputs, draft, strict=False))
    return outputs


def speculative_step(model: nn.Module, seq: Sequence) -> list[StepOutput]:
    """One decode step for a sequence with a `Speculator`: its chosen draft length (0: plain decoding), timed,
    with the step's drafts and kept drafts reported back so an adaptive length follows what pays."""
    spec = seq.speculator
    k = spec.choose()
    drafted, accepted = seq.drafted, seq.accepted
    start = time.perf_counter()
    outputs = speculative_decode(model, seq, spec.proposer, k) if k else decode(model, [seq])
    spec.record(k, seq.drafted - drafted, seq.accepted - accepted, time.perf_counter() - start)
    return outputs


def run_to_completion(model: nn.Module, sequences: list[Sequence]) -> None:
    """Prefill every sequence, then decode the unfinished ones together until all are done."""
    prefill(model, sequences)
    while active := [seq for seq in sequences if not seq.finished]:
        decode(model, active)

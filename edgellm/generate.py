"""The generation loop only: prefill, sample, decode, stream text. Sampling and caches live elsewhere."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from edgellm.errors import InvalidRequestError
from edgellm.kv.prompt_cache import PromptCache
from edgellm.sampling import Sampler, SamplingParams
from edgellm.tokenizer import Tokenizer

PREFILL_CHUNK = 2048  # bounds attention scratch memory on long prompts


@dataclass
class GenerationResponse:
    """One streamed step: the new text piece and running statistics."""

    text: str
    token: int | None
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    finish_reason: str | None = None
    predicted_tokens: int = 0  # prompt tokens whose K/V a KV predictor supplied


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    finish_reason: str
    stats: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("text", "tokens", "prompt_tokens", "cached_tokens", "ttft_s",
                                              "prefill_tok_s", "decode_tok_s", "finish_reason")}


class StopStringMatcher:
    """Holds back streamed text that might be the start of a stop string; cuts at the first full match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit."""
        self.pending += piece
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def context_length(model: nn.Module) -> int:
    return int(model.args.max_position_embeddings)


def prepare_prompt(tokenizer: Tokenizer, prompt: str | list[int], model: nn.Module) -> list[int]:
    """Token ids of `prompt`, checked against the model's context window."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids or (isinstance(prompt, str) and not prompt):
        raise InvalidRequestError("prompt is empty; give at least one token of text")
    limit = context_length(model)
    if len(ids) >= limit:
        raise InvalidRequestError(f"prompt has {len(ids)} tokens but the model's context window is {limit}; "
                                  "shorten the prompt")
    return ids


@torch.no_grad()
def prefill(model: nn.Module, tokens: list[int], cache: PromptCache, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run `tokens` through the model into `cache`; returns the last position's logits (vocab,)."""
    if not tokens:
        raise InvalidRequestError("nothing to prefill: the prompt adds no token past the cached ones")
    logits = None
    for start in range(0, len(tokens), chunk):
        piece = torch.tensor([tokens[start:start + chunk]], dtype=torch.long)
        logits = model(piece, cache.layers, last_only=True)
        cache.tokens.extend(tokens[start:start + chunk])
    return logits[0, -1]


@torch.no_grad()
def stream_generate(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: list[str] | None = None,
                    prompt_cache: PromptCache | None = None,
                    kv_predictor: nn.Module | None = None) -> Iterator[GenerationResponse]:
    """Yield text pieces as tokens are generated; with `prompt_cache`, reuse and extend its KV memory.

    With `kv_predictor` (edgellm.kvpred), the uncached prompt tokens but the last get predicted K/V instead of a
    base prefill; the base runs the last prompt token on top of them, then decodes alone.
    """
    t0 = time.perf_counter()
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = prepare_prompt(tokenizer, prompt, model)
    sampler = Sampler(sampling)
    limit = context_length(model)
    max_tokens = min(max_tokens, limit - len(ids))
    if prompt_cache is None:
        prompt_cache = PromptCache(model, capacity=len(ids) + max_tokens)
    cached = prompt_cache.reuse(ids)
    if kv_predictor is not None:
        kv_predictor.prefill(model, ids[:-1], prompt_cache, start=cached)
    predicted = len(prompt_cache.tokens) - cached
    logits = prefill(model, ids[len(prompt_cache.tokens):], prompt_cache)
    history = torch.tensor(ids, dtype=torch.long)
    detok = tokenizer.detokenizer()
    stops = StopStringMatcher(stop or [])
    generated: list[int] = []
    t_first = t_last = time.perf_counter()
    prefill_s = t_first - t0

    def response(text: str, token: int | None, finish: str | None) -> GenerationResponse:
        decode_s = t_last - t_first
        return GenerationResponse(
            text=text, token=token, prompt_tokens=len(ids), cached_tokens=cached,
            generation_tokens=len(generated), ttft_s=prefill_s,
            prefill_tok_s=(len(ids) - cached) / prefill_s if prefill_s > 0 else 0.0,
            decode_tok_s=(len(generated) - 1) / decode_s if decode_s > 0 else 0.0, finish_reason=finish,
            predicted_tokens=predicted)

    while True:
        token = sampler(logits, history if sampler.params.repetition_penalty != 1.0 else None)
        t_last = time.perf_counter()
        if not generated:
            prefill_s = t_last - t0
            t_first = t_last
        generated.append(token)
        if token in tokenizer.eos_token_ids:
            yield response(stops.flush() + detok.flush(), token, "stop")
            return
        text, hit = stops.feed(detok.add(token))
        if hit:
            yield response(text, token, "stop")
            return
        if len(generated) >= max_tokens:
            tail, hit = stops.feed(detok.flush())
            yield response(text + tail + stops.flush(), token, "stop" if hit else "length")
            return
        yield response(text, token, None)
        history = torch.cat([history, torch.tensor([token])])
        logits = model(torch.tensor([[token]]), prompt_cache.layers, last_only=True)[0, -1]
        prompt_cache.tokens.append(token)


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], max_tokens: int = 256,
             sampling: SamplingParams | None = None, stop: list[str] | None = None,
             prompt_cache: PromptCache | None = None, kv_predictor: nn.Module | None = None) -> GenerationResult:
    """Generate to completion and return the text with timing statistics."""
    text, tokens, last = [], [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, sampling, stop, prompt_cache, kv_predictor):
        text.append(last.text)
        if last.token is not None:
            tokens.append(last.token)
    return GenerationResult(text="".join(text), tokens=tokens, prompt_tokens=last.prompt_tokens,
                            cached_tokens=last.cached_tokens, ttft_s=last.ttft_s, prefill_tok_s=last.prefill_tok_s,
                            decode_tok_s=last.decode_tok_s, finish_reason=last.finish_reason,
                            stats={"predicted_tokens": last.predicted_tokens} if last.predicted_tokens else {})


@dataclass
class _Sequence:
    """Book-keeping for one sequence of a batch."""

    ids: list[int]
    cache: PromptCache
    sampler: Sampler
    stops: StopStringMatcher
    detok: object
    cached: int = 0
    logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    ttft_s: float = 0.0


@torch.no_grad()
def batch_generate(model: nn.Module, tokenizer: Tokenizer, prompts: list[str | list[int]], max_tokens: int = 256,
                   sampling: SamplingParams | list[SamplingParams] | None = None, stop: list[str] | None = None,
                   prompt_caches: list[PromptCache] | None = None) -> list[GenerationResult]:
    """Generate for several prompts (e.g. several agents' turns), decoding all of them in one forward pass a step.

    Each sequence keeps its own cache (reused and extended like `generate`'s); sequences leave the batch as
    they finish. Greedy results equal generating each prompt alone.
    """
    from edgellm.kv.batch import batch_layers

    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
    t0 = time.perf_counter()
    params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    if len(params) != len(prompts) or (prompt_caches is not None and len(prompt_caches) != len(prompts)):
        raise InvalidRequestError(f"batch_generate got {len(prompts)} prompts but {len(params)} sampling settings "
                                  f"and {len(prompt_caches or prompts)} caches; give one of each per prompt")
    seqs = []
    for i, prompt in enumerate(prompts):
        ids = prepare_prompt(tokenizer, prompt, model)
        cache = prompt_caches[i] if prompt_caches else PromptCache(model, capacity=len(ids) + max_tokens)
        seq = _Sequence(ids, cache, Sampler(params[i]), StopStringMatcher(stop or []), tokenizer.detokenizer())
        seq.cached = cache.reuse(ids)
        seq.logits = prefill(model, ids[seq.cached:], cache)
        seqs.append(seq)
    limit = context_length(model)
    decode_steps, t_decode = 0, time.perf_counter()
    active = seqs
    while active:
        for seq in active:
            penalty = seq.sampler.params.repetition_penalty != 1.0
            token = seq.sampler(seq.logits, torch.tensor(seq.ids + seq.generated) if penalty else None)
            if not seq.generated:
                seq.ttft_s = time.perf_counter() - t0
            seq.generated.append(token)
            if token in tokenizer.eos_token_ids:
                seq.text.append(seq.stops.flush() + seq.detok.flush())
                seq.finish = "stop"
                continue
            piece, hit = seq.stops.feed(seq.detok.add(token))
            seq.text.append(piece)
            if hit:
                seq.finish = "stop"
            elif len(seq.generated) >= min(max_tokens, limit - len(seq.ids)):
                seq.text.append(seq.stops.feed(seq.detok.flush())[0] + seq.stops.flush())
                seq.finish = "length"
        active = [s for s in active if s.finish is None]
        if not active:
            break
        tokens = torch.tensor([[s.generated[-1]] for s in active])
        layers = batch_layers([s.cache.layers for s in active], model.args.sliding_window)
        logits = model(tokens, layers, last_only=True)[:, -1]
        decode_steps += 1
        for seq, row in zip(active, logits, strict=True):
            seq.cache.tokens.append(seq.generated[-1])
            seq.logits = row
    decode_s = time.perf_counter() - t_decode
    return [GenerationResult(
        text="".join(s.text), tokens=s.generated, prompt_tokens=len(s.ids), cached_tokens=s.cached,
        ttft_s=s.ttft_s, prefill_tok_s=0.0, decode_tok_s=decode_steps / decode_s if decode_s > 0 else 0.0,
        finish_reason=s.finish or "length", stats={"batch_decode_steps": decode_steps}) for s in seqs]

"""The public generation API: `generate`, `stream_generate`, `batch_generate`, all driving `Sequence`s through the
runner. The per-token step lives in `edgellm.sequence`, the forward loops in `edgellm.runner`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from edgellm import runner
from edgellm.errors import InvalidRequestError
from edgellm.kv.prompt_cache import PromptCache
from edgellm.sampling import SamplingParams
from edgellm.sequence import Sequence, StepOutput, context_length, prepare_prompt
from edgellm.speculative import Speculation, make_speculator
from edgellm.tokenizer import Tokenizer


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
    drafted_tokens: int = 0  # speculative decoding: draft tokens checked so far
    accepted_tokens: int = 0  # ... and those the model kept


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


def _response(seq: Sequence, out: StepOutput, generated: int | None = None) -> GenerationResponse:
    """`generated`: the token count at `out` when one step produced several (speculative decoding)."""
    if seq.error is not None:  # the sequence failed in its own step (e.g. its grammar): the caller hears why
        raise seq.error
    return GenerationResponse(
        text=out.text, token=out.token, prompt_tokens=len(seq.ids), cached_tokens=seq.cached,
        generation_tokens=len(seq.generated) if generated is None else generated, ttft_s=seq.ttft_s,
        prefill_tok_s=seq.prefill_tok_s, decode_tok_s=seq.decode_tok_s, finish_reason=out.finish_reason,
        predicted_tokens=seq.predicted, drafted_tokens=seq.drafted, accepted_tokens=seq.accepted)


def _decode(model: nn.Module, seq: Sequence) -> list[StepOutput]:
    """One decode step: plain, or speculative (drafted tokens checked in the same pass) for a speculating sequence."""
    return runner.speculative_step(model, seq) if seq.speculator else runner.decode(model, [seq])


def _sequence(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], max_tokens: int,
              sampling: SamplingParams | None, stop: list[str] | None, prompt_cache: PromptCache | None,
              kv_predictor: nn.Module | None, speculate: int | Speculation,
              draft_model: nn.Module | None, adapter: str | None) -> Sequence:
    """One request as a Sequence (its cache reserved for prompt + answer when none is given); TTFT counts from here."""
    started = time.perf_counter()
    ids = prepare_prompt(tokenizer, prompt, model)
    capacity = len(ids) + max(1, min(max_tokens, context_length(model)))
    speculator = make_speculator(speculate, sampling, capacity + 64, draft_model, kv_predictor)
    if prompt_cache is None:
        prompt_cache = PromptCache(model, capacity=capacity)
    return Sequence(model, tokenizer, ids, prompt_cache, max_tokens, sampling, stop, kv_predictor, started,
                    speculator=speculator, adapter=adapter)


def _result(seq: Sequence, **stats) -> GenerationResult:
    if seq.error is not None:
        raise seq.error
    if seq.predicted:
        stats["predicted_tokens"] = seq.predicted
    if seq.drafted:
        stats["drafted_tokens"], stats["accepted_tokens"] = seq.drafted, seq.accepted
        stats["verify_steps"] = seq.verify_steps
    return GenerationResult(text="".join(seq.text), tokens=list(seq.generated), prompt_tokens=len(seq.ids),
                            cached_tokens=seq.cached, ttft_s=seq.ttft_s, prefill_tok_s=seq.prefill_tok_s,
                            decode_tok_s=seq.decode_tok_s, finish_reason=seq.finish_reason or "length", stats=stats)


def stream_generate(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, stop: list[str] | None = None,
                    prompt_cache: PromptCache | None = None, kv_predictor: nn.Module | None = None,
                    speculate: int | Speculation = 0, draft_model: nn.Module | None = None,
                    adapter: str | None = None) -> Iterator[GenerationResponse]:
    """Yield text pieces as tokens are generated; with `prompt_cache`, reuse and extend its KV memory.

    With `kv_predictor` (edgellm.kvpred), the uncached prompt tokens but the last get predicted K/V instead of a
    base prefill; the base runs the last prompt token on top of them, then decodes alone. With `speculate`, each
    forward pass checks drafted tokens (fewer passes when the drafts hold): an int k > 0 drafts up to k tokens by
    prompt lookup; a `Speculation` names the proposer (prompt lookup, `draft_model` sharing the tokenizer, or the
    KV predictor's aux) and lets the draft length adapt. Greedy output is unchanged, sampled output keeps its
    distribution (speculative sampling). `adapter` names a LoRA adapter loaded on the model (`load_adapter`).
    """
    seq = _sequence(model, tokenizer, prompt, max_tokens, sampling, stop, prompt_cache, kv_predictor, speculate,
                    draft_model, adapter)
    (_, out), = runner.prefill(model, [seq])
    yield _response(seq, out)
    while not seq.finished:
        outs = _decode(model, seq)
        base = len(seq.generated) - len(outs)
        for i, out in enumerate(outs, 1):
            yield _response(seq, out, base + i)


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], max_tokens: int = 256,
             sampling: SamplingParams | None = None, stop: list[str] | None = None,
             prompt_cache: PromptCache | None = None, kv_predictor: nn.Module | None = None,
             speculate: int | Speculation = 0, draft_model: nn.Module | None = None,
             adapter: str | None = None) -> GenerationResult:
    """Generate to completion and return the text with timing statistics (`speculate`: see `stream_generate`)."""
    seq = _sequence(model, tokenizer, prompt, max_tokens, sampling, stop, prompt_cache, kv_predictor, speculate,
                    draft_model, adapter)
    if seq.speculator is None:
        runner.run_to_completion(model, [seq])
        return _result(seq)
    runner.prefill(model, [seq])
    while not seq.finished:
        _decode(model, seq)
    return _result(seq)


def batch_generate(model: nn.Module, tokenizer: Tokenizer, prompts: list[str | list[int]], max_tokens: int = 256,
                   sampling: SamplingParams | list[SamplingParams] | None = None, stop: list[str] | None = None,
                   prompt_caches: list[PromptCache] | None = None,
                   kv_predictor: nn.Module | None = None,
                   adapters: list[str | None] | None = None) -> list[GenerationResult]:
    """Generate for several prompts (e.g. several agents' turns), decoding all of them in one forward pass a step.

    Each sequence keeps its own cache (reused and extended like `generate`'s); sequences leave the batch as
    they finish; with `adapters`, prompt i uses LoRA adapter adapters[i] (None: the base), all in one batch.
    Greedy results equal generating each prompt alone.
    """
    started = time.perf_counter()
    params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    names = adapters or [None] * len(prompts)
    if len(params) != len(prompts) or len(names) != len(prompts) or (
            prompt_caches is not None and len(prompt_caches) != len(prompts)):
        raise InvalidRequestError(f"batch_generate got {len(prompts)} prompts but {len(params)} sampling settings, "
                                  f"{len(names)} adapters and {len(prompt_caches or prompts)} caches; give one of "
                                  "each per prompt")
    seqs = []
    for i, prompt in enumerate(prompts):
        ids = prepare_prompt(tokenizer, prompt, model)
        cache = prompt_caches[i] if prompt_caches else PromptCache(model, capacity=len(ids) + max(1, max_tokens))
        seqs.append(Sequence(model, tokenizer, ids, cache, max_tokens, params[i], stop, kv_predictor, started,
                             adapter=names[i]))
    runner.prefill(model, seqs)
    steps, decode_start = 0, time.perf_counter()
    while active := [seq for seq in seqs if not seq.finished]:
        runner.decode(model, active)
        steps += 1
    decode_s = time.perf_counter() - decode_start
    return [_result(seq, batch_decode_steps=steps, batch_decode_steps_per_s=steps / decode_s if decode_s > 0 else 0.0)
            for seq in seqs]

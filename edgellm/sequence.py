"""One sequence being generated, and `Sequence.advance`: the only per-token step in edgellm.

Everything that turns logits into a token and the token into streamed text lives here once: logits processors and
sampling, EOS, stop strings, the length limit, the finish reason and the timing statistics (TTFT, tok/s).
`generate`, `batch_generate`, the server's scheduler and the benchmarks all drive sequences through the runner.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.kv.prompt_cache import PromptCache
from edgellm.models.lora import adapters
from edgellm.sampling import Sampler, SamplingParams, TokenLogprob, token_logprobs
from edgellm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from edgellm.speculative import Speculator


class State(enum.Enum):
    WAITING = "waiting"  # created, cache not yet matched against the prompt
    PREFILL = "prefill"  # prompt tokens left to run
    DECODE = "decode"  # one token per step
    FINISHED = "finished"


@dataclass
class StepOutput:
    """What one `advance` produced: the token, the text now safe to show, why the sequence ended (if it did) and,
    when the sequence asked for them, the token's logprobs (none for EOS, which is not part of the answer)."""

    token: int
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None


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


def check_prompt(ids: list[int], context: int) -> list[int]:
    """The one prompt check: at least one token, and room for one generated token in the context window."""
    if not ids:
        raise InvalidRequestError("prompt is empty; give at least one token of text")
    if len(ids) >= context:
        raise InvalidRequestError(f"prompt has {len(ids)} tokens but the model's context window is {context}; "
                                  "shorten the prompt")
    return ids


def prepare_prompt(tokenizer: Tokenizer, prompt: str | list[int], model: nn.Module) -> list[int]:
    """Token ids of `prompt`, checked against the model's context window."""
    if isinstance(prompt, str) and not prompt:
        raise InvalidRequestError("prompt is empty; give at least one token of text")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return check_prompt(ids, context_length(model))


class Sequence:
    """A prompt, its cache, its sampling chain and its detokenizer; advanced one token at a time by the runner.

    `kv_predictor` (edgellm.kvpred), when given, supplies the K/V of the uncached prompt but its last token;
    the runner asks it once, before the base prefill. `started_at` is when the request arrived: TTFT counts
    from there (the server passes the submission time, so queueing counts too). Without a tokenizer (benchmarks
    on random models) a sequence produces token ids only: no text, no EOS. With `logprobs` (the number of top
    alternatives, 0 for none) each step also reports the token's logprob; None costs nothing. With a `speculator`
    (edgellm.speculative) the runner's `speculative_step` decodes it, checking drafted tokens. `adapter` names a
    LoRA adapter resident on the model (edgellm.models.lora) that every forward of this sequence uses.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, ids: list[int], cache: PromptCache,
                 max_tokens: int, sampling: SamplingParams | None = None, stop: list[str] | None = None,
                 kv_predictor: nn.Module | None = None, started_at: float | None = None,
                 ignore_eos: bool = False, logprobs: int | None = None,
                 speculator: Speculator | None = None, adapter: str | None = None) -> None:
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
        if adapter is not None:
            adapters(model).check(adapter)
            if kv_predictor is not None:
                raise InvalidRequestError("a KV predictor predicts the base model's K/V, not an adapter's; use "
                                          "one or the other")
        context = context_length(model)
        self.ids = check_prompt(ids, context)
        self.cache = cache
        self.max_tokens = min(max_tokens, context - len(ids))  # the one clamp to the context window
        self.sampler = Sampler(sampling, prompt_len=len(ids))
        self.stops = StopStringMatcher(stop or [])
        self.detok = tokenizer.detokenizer() if tokenizer is not None else None
        self.eos = set() if ignore_eos or tokenizer is None else set(tokenizer.eos_token_ids)
        self.kv_predictor = kv_predictor
        self.speculator = speculator
        self.adapter = adapter
        self.logprobs = logprobs
        self.state = State.WAITING
        self.cached = 0  # prompt tokens whose K/V the cache already held
        self.predicted = 0  # prompt tokens whose K/V the KV predictor supplied
        self.drafted = self.accepted = 0  # speculative decoding: draft tokens verified, and those the model kept
        self.verify_steps = 0  # speculative decoding: forward passes that checked a draft
        self.pending: list[int] = []  # prompt tokens still to prefill
        self.generated: list[int] = []
        self.text: list[str] = []
        self.finish_reason: str | None = None  # "stop" | "length" | "error" (then `error` says why)
        self.error: Exception | None = None
        self.started_at = time.perf_counter() if started_at is None else started_at
        self.first_token_at = self.last_token_at = 0.0
        # prompt then generated ids for the logits processors, preallocated: no concatenation per token
        self._tokens = torch.tensor(ids + [0] * self.max_tokens, dtype=torch.long) if self.sampler.needs_history \
            else None

    def begin(self) -> None:
        """Match the cache against the prompt: only tokens past the reusable prefix will be prefilled."""
        self.cached = self.cache.reuse(self.ids)
        self.pending = self.ids[self.cached:]
        self.state = State.PREFILL

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def advance(self, logits: torch.Tensor, draft: int | None = None, draft_probs: torch.Tensor | None = None
                ) -> StepOutput:
        """Pick the next token from the last position's `logits` (vocab,), stream its text, decide whether to stop.

        `draft`: a token speculative decoding proposed here, drawn from `draft_probs` (None: proposed with
        certainty); the sampler keeps it or replaces it (`Sampler.verify`).
        """
        n = len(self.ids) + len(self.generated)
        try:
            history = None if self._tokens is None else self._tokens[:n]
            token = self.sampler(logits, history) if draft is None else \
                self.sampler.verify(logits, history, draft, draft_probs)
            end = token in self.eos or self.sampler.accept(token)  # EOS, or the grammar's end (even if EOS is ignored)
        except (EdgeLLMError, RuntimeError) as e:  # e.g. a grammar in an error state: this sequence fails, not a batch
            self.error, self.state, self.finish_reason = e, State.FINISHED, "error"
            return StepOutput(-1, "", "error")
        now = time.perf_counter()
        if not self.generated:
            self.first_token_at = now
        self.last_token_at = now
        self.generated.append(token)
        if self._tokens is not None and n < len(self._tokens):
            self._tokens[n] = token
        finish = None
        if self.detok is None:
            text, finish = "", "length" if len(self.generated) >= self.max_tokens else None
        elif end:
            text, finish = self.stops.flush() + self.detok.flush(), "stop"
        else:
            text, hit = self.stops.feed(self.detok.add(token))
            if hit:
                finish = "stop"
            elif len(self.generated) >= self.max_tokens:
                tail, hit = self.stops.feed(self.detok.flush())  # a stop string the last bytes complete still stops
                text, finish = text + tail + self.stops.flush(), "stop" if hit else "length"
        self.text.append(text)
        self.state = State.FINISHED if finish else State.DECODE
        self.finish_reason = finish
        logprob = None
        if self.logprobs is not None and not end:
            logprob = token_logprobs(logits[None], [token], self.logprobs)[0]
        return StepOutput(token, text, finish, logprob)

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED

    @property
    def ttft_s(self) -> float:
        return self.first_token_at - self.started_at if self.generated else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return (len(self.ids) - self.cached) / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first per second of decoding (the first token is the prefill's)."""
        span = self.last_token_at - self.first_token_at
        return (len(self.generated) - 1) / span if span > 0 else 0.0

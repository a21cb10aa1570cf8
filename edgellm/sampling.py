"""Sampling as a chain, in the spirit of mlx-lm's `make_logits_processors` / `make_sampler` and llama.cpp's chain.

Logits processors (presence/frequency penalties, repetition penalty, logit bias, a grammar) rewrite the logits given the
tokens so far; the sampler then picks: greedy, or temperature → top-k → top-p → min-p → a seeded draw. A processor
with state (a grammar) also has `accept(token) -> bool`, told the picked token, True when that token ends the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from edgellm.errors import InvalidRequestError

if TYPE_CHECKING:
    from edgellm.grammar import Grammar

# (tokens so far: prompt then generated, logits (vocab,)) -> logits
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TokenSampler(Protocol):
    def __call__(self, logits: torch.Tensor, draft: int | None = None, draft_probs: torch.Tensor | None = None) -> int:
        """A token id from processed `logits` (vocab,); given a `draft` (drawn from `draft_probs`, None: proposed
        with certainty), the token to keep in its place, distributed exactly as a plain draw (see `make_sampler`)."""
        ...


@dataclass
class SamplingParams:
    """How the next token is picked; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> bias in [-100, 100] added to its logit
    grammar: Grammar | None = None  # constrained decoding (response_format); each sequence gets its own matcher

    def validate(self) -> SamplingParams:
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequestError(f"{name} must be a finite number, got {getattr(self, name)}")
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.seed is None or -2**63 <= self.seed < 2**64,  # what torch.Generator.manual_seed takes
             f"seed must be a 64-bit integer (-2**63 to 2**64-1), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)
        for token, bias in (self.logit_bias or {}).items():
            if token < 0 or not (math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidRequestError(f"logit_bias maps token ids >= 0 to biases in [-100, 100], got "
                                          f"{token}: {bias}")
        return self


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty as transformers applies it: seen tokens' logits shrink toward less likely."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    logits = logits.clone()
    logits.scatter_(-1, history, torch.where(seen < 0, seen * penalty, seen / penalty))
    return logits


def apply_openai_penalties(logits: torch.Tensor, generated: torch.Tensor, presence: float,
                           frequency: float) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over the generated tokens (the prompt is not penalised)."""
    if generated.numel() == 0:
        return logits
    seen, counts = torch.unique(generated, return_counts=True)
    logits = logits.clone()
    logits[seen] -= presence + frequency * counts.to(logits.dtype)
    return logits


class LogitBias:
    """OpenAI's `logit_bias`: fixed amounts added to some tokens' logits (+100 all but forces a token, -100 all but
    bans it). Token ids past the logits' width are refused here: the caller may not know the vocabulary."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)
        self.largest = max(bias)

    def __call__(self, tokens: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        if self.largest >= logits.shape[-1]:
            raise InvalidRequestError(f"logit_bias names token {self.largest} but the vocabulary has "
                                      f"{logits.shape[-1]} tokens")
        return logits.index_add(-1, self.ids, self.values.to(logits.dtype))


def make_logits_processors(params: SamplingParams, prompt_len: int) -> list[LogitsProcessor]:
    """The processors `params` asks for, in the order they apply; `prompt_len` splits prompt from generated."""
    processors: list[LogitsProcessor] = []
    if params.presence_penalty or params.frequency_penalty:
        processors.append(lambda tokens, logits: apply_openai_penalties(
            logits, tokens[prompt_len:], params.presence_penalty, params.frequency_penalty))
    if params.repetition_penalty != 1.0:
        processors.append(lambda tokens, logits: apply_repetition_penalty(logits, tokens, params.repetition_penalty))
    if params.logit_bias:  # after the penalties: a +100 bias forces its token however often it was repeated
        processors.append(LogitBias(params.logit_bias))
    if params.grammar is not None:  # last: nothing after it may revive a masked token
        processors.append(params.grammar.processor())
    return processors


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set the logits of tokens outside top-k / the top-p nucleus / below min_p·max to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # keeps the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def make_sampler(params: SamplingParams) -> TokenSampler:
    """A function from processed logits (vocab,) to a token id; it owns the request's seeded generator.

    With a `draft` d drawn from q (`draft_probs`), speculative sampling (Leviathan et al. / Chen et al. 2023):
    keep d with probability min(1, p(d)/q(d)), else draw from max(0, p - q) normalised; P(x) = min(q(x), p(x)) +
    max(0, p(x) - q(x)) = p(x). Without q (a deterministic proposer, q one-hot at d) that is: keep d with
    probability p(d), else draw from p without d, exact given any d (so for any proposer), but keeping fewer
    sampled drafts (sum of q·p rather than of min(p, q)). Both draws use the request's generator, so a seeded
    request stays reproducible. Greedy ignores the draft: the argmax is kept whatever was
    guessed.
    """
    if params.temperature == 0:  # fp32 argmax: the same index (the upcast is exact), ~3x faster than bf16's
        return lambda logits, draft=None, draft_probs=None: int(logits.float().argmax())
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()

    def sample(logits: torch.Tensor, draft: int | None = None, draft_probs: torch.Tensor | None = None) -> int:
        logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
        probs = logits.softmax(-1)
        if draft is not None:
            q = 1.0 if draft_probs is None else float(draft_probs[draft])
            if float(torch.rand((), generator=generator)) * q < float(probs[draft]):
                return draft
            if draft_probs is None:
                probs[draft] = 0.0
            else:
                probs = (probs - draft_probs.to(probs.dtype)).clamp_(min=0.0)
            if not probs.any():  # p and q equal up to rounding: the draft is all there is to keep
                return draft
        return int(torch.multinomial(probs, 1, generator=generator))

    return sample


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the `top` most likely tokens' (token, logprob), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Row i of `logits` (n, vocab) scores `tokens[i]`. Raw model logits, before processors and temperature: the
    model's own distribution, as OpenAI and vLLM report it."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    k = min(top, logprobs.shape[-1])
    values, ids = logprobs.topk(k, -1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [TokenLogprob(t, lp, list(zip(i, v, strict=True)))
            for t, lp, i, v in zip(tokens, chosen, ids.tolist(), values.tolist(), strict=True)]


class Sampler:
    """The whole chain for one sequence: processors, then the sampler."""

    def __init__(self, params: SamplingParams | None = None, prompt_len: int = 0) -> None:
        self.params = (params or SamplingParams()).validate()
        self.processors = make_logits_processors(self.params, prompt_len)
        self.sample = make_sampler(self.params)

    @property
    def needs_history(self) -> bool:
        return bool(self.processors)

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor | None = None) -> int:
        """Next token from `logits` (vocab,); `tokens` (prompt then generated) feeds the processors."""
        return self.sample(self._process(logits, tokens))

    def verify(self, logits: torch.Tensor, tokens: torch.Tensor | None, draft: int,
               draft_probs: torch.Tensor | None = None) -> int:
        """The token to keep where `draft` (drawn from `draft_probs`; None: proposed with certainty) was proposed:
        `draft` itself when accepted, else the replacement; the result has the same distribution as
        `self(logits, tokens)` (speculative sampling, see `make_sampler`)."""
        return self.sample(self._process(logits, tokens), draft, draft_probs)

    def _process(self, logits: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        logits = logits.float()
        for process in self.processors:
            logits = process(tokens, logits)
        return logits

    def accept(self, token: int) -> bool:
        """Tell the stateful processors the picked token; True when one says it ends the output."""
        return any([accept(token) for p in self.processors if (accept := getattr(p, "accept", None))])

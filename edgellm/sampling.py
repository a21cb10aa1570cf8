"""Samplers: greedy, temperature, top-k, top-p, min-p and repetition penalty, seeded per request."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.errors import InvalidRequestError


@dataclass
class SamplingParams:
    """How the next token is picked; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)
        return self


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty as transformers applies it: seen tokens' logits shrink toward less likely."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    logits = logits.clone()
    logits.scatter_(-1, history, torch.where(seen < 0, seen * penalty, seen / penalty))
    return logits


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


class Sampler:
    """Picks token ids from last-position logits; owns the request's random generator."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = (params or SamplingParams()).validate()
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        """Next token from `logits` (vocab,); `history` holds the ids the repetition penalty looks at."""
        p = self.params
        logits = logits.float()
        if history is not None:
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.temperature == 0:
            return int(logits.argmax())
        logits = filter_logits(logits / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

"""Draft proposers for speculative decoding: cheap guesses at the next tokens, which the runner verifies with one
forward pass of the model (`runner.speculative_decode`). A wrong guess costs only the wasted positions.

Three proposers sit behind one interface: prompt lookup (`NGramProposer`, no second model), a smaller model
sharing the tokenizer (`DraftModelProposer`), and KV Prediction's aux model, whose cache already holds the prompt
(`DraftModelProposer` over `KVPredictor.aux`). `DraftLength` picks each step's draft length from what it measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from edgellm.errors import InvalidRequestError
from edgellm.kv.prompt_cache import PromptCache
from edgellm.sampling import SamplingParams, filter_logits

if TYPE_CHECKING:
    from edgellm.tokenizer import Tokenizer

MODES = ("ngram", "draft", "kvpred")


class Proposer(Protocol):
    """Guesses the next tokens. A proposer that samples its guesses also sets `probs` (one row per guess: the
    distribution it was drawn from) for the verifier's min(1, p/q) rule; a deterministic one leaves it None."""

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` guesses at the tokens that follow `tokens` (prompt then generated); [] when there is no guess."""
        ...


class NGramProposer:
    """Prompt-lookup decoding (transformers' prompt_lookup_num_tokens, llama.cpp's lookup): no draft model.

    Finds the most recent earlier occurrence of the last n tokens (n from `max_ngram` down to `min_ngram`) and
    proposes what followed it. Edits, quotes and code re-emit their context verbatim, so the guesses often hold.
    """

    probs = None  # deterministic: each guess has probability 1

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: list[int], k: int) -> list[int]:
        size = len(tokens)
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            tail, last = tokens[-n:], tokens[-1]
            for start in range(size - n - 1, -1, -1):
                if tokens[start + n - 1] == last and tokens[start:start + n] == tail:
                    return self._follow(tokens, start + n, k)
        return []

    @staticmethod
    def _follow(tokens: list[int], pos: int, k: int) -> list[int]:
        """`k` tokens from `pos` on; past the end the guess continues from itself, so a repeating span (a loop,
        a list) yields a full draft rather than only the tokens up to the end of the context."""
        draft: list[int] = []
        for i in range(pos, pos + k):
            draft.append(tokens[i] if i < len(tokens) else draft[i - len(tokens)])
        return draft


def check_draft_model(draft: nn.Module, draft_tokenizer: Tokenizer, model: nn.Module, tokenizer: Tokenizer) -> None:
    """Refuse a draft model that does not share the model's tokenizer: its token ids would mean other text."""
    if draft_tokenizer.fingerprint != tokenizer.fingerprint:
        raise InvalidRequestError("the draft model's tokenizer differs from the model's (tokenizer fingerprints "
                                  f"{draft_tokenizer.fingerprint[:12]} vs {tokenizer.fingerprint[:12]}); a draft "
                                  "must share the model's tokenizer")
    if draft.args.vocab_size != model.args.vocab_size:
        raise InvalidRequestError(f"the draft model's vocabulary has {draft.args.vocab_size} tokens, the model's "
                                  f"{model.args.vocab_size}; a draft must share the model's tokenizer")


class DraftModelProposer:
    """A smaller model sharing the tokenizer drafts `k` tokens one at a time from its own cache.

    The cache follows the context lazily: each `propose` keeps the longest prefix of the context it holds (so
    drafts the model rejected are trimmed there) and runs the rest in one pass. Greedy requests draft the draft
    model's argmax; sampled ones draw from its distribution under the request's temperature and filters, seeded
    from the request's seed, and leave those distributions in `probs`. Over KV Prediction's aux, the predictor
    fills `cache` with the prompt as it predicts (`runner.prefill`), so drafting costs no prefill of its own.
    """

    def __init__(self, model: nn.Module, capacity: int, sampling: SamplingParams | None = None) -> None:
        self.model = model
        self.cache = PromptCache(model, capacity)
        self.params = sampling or SamplingParams()
        self.generator: torch.Generator | None = None
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            if self.params.seed is None:
                self.generator.seed()
            else:  # another stream than the verifier's, still fixed by the request's seed
                self.generator.manual_seed((self.params.seed + 0x9E3779B97F4A7C15) % 2**64)
        self.probs: torch.Tensor | None = None

    @torch.no_grad()
    def propose(self, tokens: list[int], k: int) -> list[int]:
        self.cache.reuse(tokens)
        logits = self._run(tokens[len(self.cache.tokens):])
        draft, probs = [], []
        for _ in range(k):
            if draft:
                logits = self._run(draft[-1:])
            if self.generator is None:
                draft.append(int(logits.argmax()))
                continue
            p = filter_logits(logits.float() / self.params.temperature, self.params.top_k, self.params.top_p,
                              self.params.min_p).softmax(-1)
            draft.append(int(torch.multinomial(p, 1, generator=self.generator)))
            probs.append(p)
        self.probs = torch.stack(probs) if probs else None
        return draft

    def _run(self, tokens: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([tokens], dtype=torch.long), self.cache.layers, last_only=True)
        self.cache.tokens.extend(tokens)
        return logits[0, -1]


@dataclass
class Speculation:
    """How a request speculates: the proposer (`mode`), the longest draft `k`, and whether `DraftLength` adapts
    the length to what pays on this machine (a fixed length always drafts up to `k`). `step_seconds` holds the
    step times measured by the requests given this object, so later ones start from them instead of measuring."""

    mode: str = "ngram"
    k: int = 8
    adaptive: bool = True
    step_seconds: dict[int, float] = field(default_factory=dict, repr=False, compare=False)

    def validate(self) -> Speculation:
        if self.mode not in MODES:
            raise InvalidRequestError(f"speculative mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.k <= 64:
            raise InvalidRequestError(f"speculative k (the longest draft) must be from 1 to 64, got {self.k}")
        return self


class DraftLength:
    """Each step's draft length from measured acceptance and measured step times; 0 turns speculation off.

    With per-token acceptance a, a draft of k yields (1 - a^(k+1)) / (1 - a) tokens per step. Step times are
    measured per draft length (verify pass plus drafting, as they ran) and interpolated linearly in k, so the
    choice maximises tokens per second on this machine, with plain decoding (k = 0) as one option. Exploring is
    kept cheap, since a wasted step costs a few plain ones: the first draft is at most `PROBE_K` long, and while
    off a probe of at most `PROBE_K` every `probe` steps (the interval doubling while speculation keeps not
    paying) re-measures the acceptance; while on, a plain step every `probe` steps re-measures plain decoding
    (a busy machine's speed drifts).
    """

    PROBE_K = 3

    def __init__(self, max_k: int, probe: int = 32, decay: float = 0.9,
                 seconds: dict[int, float] | None = None) -> None:
        self.max_k, self.probe, self.decay = max_k, probe, decay
        self.kept, self.missed = 1.0, 0.5  # decayed counts of kept drafts and of steps ending in a rejection
        self.seconds = {} if seconds is None else seconds  # draft length -> smoothed seconds per step (shareable)
        self.idle = self.busy = 0  # steps since speculation, or plain decoding, was last tried
        self.interval = probe

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.missed)

    def tokens_per_step(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def step_seconds(self, k: int) -> float:
        """Measured, or interpolated from plain steps and the measured draft lengths: t(k) = t(0) + slope * k."""
        if k in self.seconds:
            return self.seconds[k]
        slopes = [(t - self.seconds[0]) / n for n, t in self.seconds.items() if n]
        return self.seconds[0] + max(0.0, sum(slopes) / len(slopes)) * k

    def choose(self) -> int:
        if 0 not in self.seconds or len(self.seconds) < 2:  # measure a plain step, then a short draft
            return min(self.max_k, self.PROBE_K) if self.seconds else 0
        best = max(range(self.max_k + 1), key=lambda k: self.tokens_per_step(k) / self.step_seconds(k))
        if best:
            self.idle, self.interval, self.busy = 0, self.probe, self.busy + 1
            if self.busy < self.probe:
                return best
            self.busy = 0
            return 0
        self.idle += 1
        if self.idle < self.interval:
            return 0
        self.idle, self.interval = 0, min(self.interval * 2, 16 * self.probe)
        return max(range(1, min(self.max_k, self.PROBE_K) + 1),
                   key=lambda k: self.tokens_per_step(k) / self.step_seconds(k))

    def record(self, drafted: int, kept: int, seconds: float) -> None:
        """One step: `drafted` guesses checked (0: a plain step), `kept` of them accepted, in `seconds`."""
        if drafted:
            self.kept = self.decay * self.kept + kept
            self.missed = self.decay * self.missed + (kept < drafted)
        old = self.seconds.get(drafted)
        self.seconds[drafted] = seconds if old is None else 0.7 * old + 0.3 * seconds


class Speculator:
    """A sequence's speculation: its proposer and its draft length (fixed, or a `DraftLength`).

    `drafts_with_aux`: the proposer drafts with KV Prediction's aux model, whose prompt cache the predictor fills.
    """

    def __init__(self, proposer: Proposer, k: int, adaptive: bool = True, drafts_with_aux: bool = False,
                 step_seconds: dict[int, float] | None = None) -> None:
        self.proposer, self.k, self.drafts_with_aux = proposer, k, drafts_with_aux
        self.length = DraftLength(k, seconds=step_seconds) if adaptive else None

    def choose(self) -> int:
        return self.k if self.length is None else self.length.choose()

    def record(self, drafted: int, kept: int, seconds: float) -> None:
        if self.length is not None:
            self.length.record(drafted, kept, seconds)


def make_speculator(speculate: int | Speculation, sampling: SamplingParams | None, capacity: int,
                    draft_model: nn.Module | None = None, kv_predictor: nn.Module | None = None) -> Speculator | None:
    """The speculator a request asks for: an int k is prompt lookup with a fixed draft length k (0: none); a
    `Speculation` names the mode. `capacity`: tokens a draft model's cache should hold (prompt + answer + draft)."""
    if isinstance(speculate, int):
        if speculate < 0:
            raise InvalidRequestError(f"speculate is a draft length (0 = off), got {speculate}")
        return Speculator(NGramProposer(), speculate, adaptive=False) if speculate else None
    spec = speculate.validate()
    if spec.mode == "ngram":
        return Speculator(NGramProposer(), spec.k, spec.adaptive, step_seconds=spec.step_seconds)
    if spec.mode == "draft":
        if draft_model is None:
            raise InvalidRequestError("speculative mode 'draft' needs a draft model (--draft-model DIR)")
        return Speculator(DraftModelProposer(draft_model, capacity, sampling), spec.k, spec.adaptive,
                          step_seconds=spec.step_seconds)
    if kv_predictor is None:
        raise InvalidRequestError("speculative mode 'kvpred' drafts with a KV predictor's aux model; give one "
                                  "(--kv-predictor DIR)")
    return Speculator(DraftModelProposer(kv_predictor.aux, capacity, sampling), spec.k, spec.adaptive,
                      drafts_with_aux=True, step_seconds=spec.step_seconds)

"""Draft proposers for speculative decoding: cheap guesses at the next tokens, which the runner verifies with one
forward pass of the model (`runner.speculative_decode`). A wrong guess costs only the wasted positions.

Three proposers sit behind one interface: prompt lookup (`NGramProposer`, no second model), a smaller model
sharing the tokenizer (`DraftModelProposer`), and KV Prediction's aux model, whose cache already holds the prompt
(`DraftModelProposer` over `KVPredictor.aux`). `DraftLength` picks each step's draft length from what it measures.
"""

from __future__ import annotations

import time
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
P_MIN = 0.0  # a draft model's default least probability for a drafted token (`DraftModelProposer`)


class Proposer(Protocol):
    """Guesses the next tokens. A proposer that samples its guesses also sets `probs` (one row per guess: the
    distribution it was drawn from) for the verifier's min(1, p/q) rule; a deterministic one leaves it None.
    `resync_seconds`: what the last `propose` spent catching up with a context it had fallen behind (a one-off the
    adaptive length should not charge to the draft length it chose), reset by `Speculator.record`."""

    resync_seconds: float

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` guesses at the tokens that follow `tokens` (prompt then generated); [] when there is no guess."""
        ...


class NGramProposer:
    """Prompt-lookup decoding (transformers' prompt_lookup_num_tokens, llama.cpp's lookup): no draft model.

    Finds the most recent earlier occurrence of the last n tokens (n from `max_ngram` down to `min_ngram`) and
    proposes what followed it. Edits, quotes and code re-emit their context verbatim, so the guesses often hold.
    """

    probs = None  # deterministic: each guess has probability 1
    resync_seconds = 0.0  # nothing to catch up: the lookup reads the context as it is

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

    The prompt goes through the draft with the model's prefill (`prefill`, from `Speculator.begin`): a catch-up
    over it at the first draft would cost a tenth of a short answer's decoding. Then the cache follows the context
    lazily: each `propose` keeps the longest prefix it holds of the context from `start` on (so drafts the model
    rejected are trimmed there) and runs the rest in one pass. A cache more than `window` tokens behind (a long
    stretch decoded with drafting off) starts over on the last `window` tokens: catching up costs a few plain steps
    at most, and the draft conditions on less context (the check keeps the output exact).
    Greedy requests draft the draft model's argmax; sampled ones draw from its distribution under the request's
    temperature and filters, seeded from the request's seed, and leave those distributions in `probs`. Over KV
    Prediction's aux, the predictor fills `cache` with the prompt as it predicts (`runner.prefill`), so drafting
    costs no prefill of its own.
    Drafting stops at the first guess the draft gives less than `p_min` probability (llama.cpp's --draft-p-min):
    an unsure guess is likely rejected and costs a draft step and a checked position.
    """

    WINDOW = 16  # fused.MANY_MAX: a catch-up runs as one fused pass (32 tokens went op at a time, ~4 plain steps)

    def __init__(self, model: nn.Module, capacity: int, sampling: SamplingParams | None = None,
                 window: int = WINDOW, p_min: float = P_MIN) -> None:
        self.model = model
        self.p_min = p_min
        self.cache = PromptCache(model, capacity)
        self.window = window
        self.start = 0  # the context position of the cache's first token
        self.resync_seconds = 0.0
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
    def prefill(self, prompt: list[int], chunk: int = 2048) -> None:
        """Run all of `prompt` but its last token (which the first `propose` runs, with the first answer token),
        `chunk` tokens at a time (as the runner's prefill, to bound attention scratch)."""
        rest = prompt[self.cache.reuse(prompt):-1]
        for i in range(0, len(rest), chunk):
            self._run(rest[i:i + chunk])

    @torch.no_grad()
    def propose(self, tokens: list[int], k: int) -> list[int]:
        context = tokens[self.start:]
        held = self.cache.reuse(context)
        if len(context) - held > self.window:
            self.start = len(tokens) - self.window
            context = tokens[self.start:]
            held = self.cache.reuse([])
        began = time.perf_counter()
        logits = self._run(context[held:])
        # a step's own catch-up is one or two tokens (the model's token, after the last kept draft)
        self.resync_seconds = time.perf_counter() - began if len(context) - held > 2 else 0.0
        draft, probs = [], []
        for _ in range(k):
            if draft:
                logits = self._run(draft[-1:])
            if self.generator is None:
                scores = logits.float()
                if self.p_min and float(scores.softmax(-1).max()) < self.p_min:
                    break
                draft.append(int(scores.argmax()))
                continue
            p = filter_logits(logits.float() / self.params.temperature, self.params.top_k, self.params.top_p,
                              self.params.min_p).softmax(-1)
            if float(p.max()) < self.p_min:
                break
            draft.append(int(torch.multinomial(p, 1, generator=self.generator)))
            probs.append(p)
        self.probs = torch.stack(probs) if probs else None
        return draft

    def _run(self, tokens: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([tokens], dtype=torch.long), self.cache.layers, last_only=True)
        self.cache.tokens.extend(tokens)
        return logits[0, -1]


@dataclass
class Measured:
    """What the requests sharing a `Speculation` have measured, so later ones start from it instead of from
    scratch: smoothed seconds per step by draft length, the decayed counts behind the acceptance rate, and how
    far apart probes have grown (a draft that keeps not paying is probed ever more rarely, across requests)."""

    seconds: dict[int, float] = field(default_factory=dict)
    kept: float = 1.0  # drafts kept
    missed: float = 0.5  # checks that ended in a rejection
    interval: int = 0  # plain steps between probes while off (0: not yet off)


@dataclass
class Speculation:
    """How a request speculates: the proposer (`mode`), the longest draft `k`, and whether `DraftLength` adapts
    the length to what pays on this machine (a fixed length always drafts up to `k`); a draft model (or aux) stops
    drafting at a guess it gives less than `p_min` probability. `measured` holds what the requests given this
    object measured (step times, acceptance), which later ones start from."""

    mode: str = "ngram"
    k: int = 8
    adaptive: bool = True
    p_min: float = P_MIN
    measured: Measured = field(default_factory=Measured, repr=False, compare=False)

    def validate(self) -> Speculation:
        if self.mode not in MODES:
            raise InvalidRequestError(f"speculative mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.k <= 64:
            raise InvalidRequestError(f"speculative k (the longest draft) must be from 1 to 64, got {self.k}")
        if not 0 <= self.p_min < 1:
            raise InvalidRequestError(f"speculative p_min (the least probability a drafted token needs) must be in "
                                      f"[0, 1), got {self.p_min}")
        return self


class DraftLength:
    """Each step's draft length from measured acceptance and step times; 0 is a plain step.

    While on, the length maximises expected tokens per second: with per-token acceptance a, a draft of k yields
    (1 - a^(k+1)) / (1 - a) tokens per step, and step times are measured per draft length (verify pass plus
    drafting, smoothed) and interpolated in k; a plain step every `retime` steps re-measures plain decoding (a busy
    machine's speed drifts). Each check is also booked against plain decoding: (kept + 1) plain steps' time minus
    its own. Speculation turns off as soon as the expected gain is none or the last `patience` checks together lost
    time (every check that does not pay is a loss, so waiting for the averages to settle is what lost), and stays
    off but for a short probe (at most `PROBE_K` drafts) after `interval` plain steps: the interval starts at
    `probe` and doubles after each probe that does not pay, one that pays turns speculation on again. Intervals,
    acceptance and step times carry over to the next request sharing the `Measured`. `patience` None: no losing
    streak turns speculation off, the expected gain alone does; `margin`: the expected gain drafting must show.
    """

    PROBE_K = 3
    MIN_SLOPE = 0.05

    def __init__(self, max_k: int, probe: int = 32, retime: int = 32, patience: int | None = 3, margin: float = 0.05,
                 decay: float = 0.9, measured: Measured | None = None) -> None:
        self.max_k, self.probe, self.retime, self.patience, self.decay = max_k, probe, retime, patience, decay
        self.margin = margin
        self.measured = Measured() if measured is None else measured
        self.seconds = self.measured.seconds  # draft length -> smoothed seconds per step
        self.on = True  # until the first check says otherwise; a plain step comes first (checks are booked on it)
        self.gains: list[float] = []  # seconds each check saved over plain decoding since speculation (re)started
        self.idle = self.busy = 0  # plain steps while off; steps since plain decoding was re-measured while on

    @property
    def acceptance(self) -> float:
        return self.measured.kept / (self.measured.kept + self.measured.missed)

    def tokens_per_step(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def step_seconds(self, k: int) -> float:
        """Measured, or interpolated from plain steps and the measured draft lengths: t(k) = t(0) + slope * k, the
        slope at least `MIN_SLOPE` of a plain step (each checked position costs something)."""
        if k in self.seconds:
            return self.seconds[k]
        slopes = [(t - self.seconds[0]) / n for n, t in self.seconds.items() if n]
        return self.seconds[0] * (1 + self.MIN_SLOPE * k) + max(0.0, sum(slopes) / len(slopes)) * k

    def best(self, top: int) -> int:
        """The draft length from 1 to `top` with the most tokens per second expected, at most twice the longest
        measured one (lengths grow as their cost is measured, not on an extrapolation)."""
        top = min(top, 2 * max(self.seconds))
        return max(range(1, top + 1), key=lambda k: self.tokens_per_step(k) / self.step_seconds(k))

    @property
    def interval(self) -> int:
        return self.measured.interval or self.probe

    def pays(self, k: int) -> bool:
        """Expected to beat plain decoding by `margin`: around break-even, costly checks add only variance."""
        return self.tokens_per_step(k) / self.step_seconds(k) > (1 + self.margin) / self.seconds[0]

    def promising(self) -> bool:
        """Whether a request starts drafting: yes until a plain step and a check are measured, then while it pays."""
        return len(self.seconds) < 2 or 0 not in self.seconds or self.pays(self.best(self.max_k))

    def choose(self) -> int:
        if 0 not in self.seconds:
            return 0
        if not self.on:
            self.idle += 1
            if self.idle < self.interval:
                return 0
            self.idle = 0
            return self.best(min(self.max_k, self.PROBE_K)) if len(self.seconds) > 1 else \
                min(self.max_k, self.PROBE_K)
        if len(self.seconds) < 2:  # no check measured yet: a short first draft
            return min(self.max_k, self.PROBE_K)
        self.busy += 1
        if self.busy >= self.retime:
            self.busy = 0
            return 0
        k = self.best(self.max_k)
        if self.pays(k):
            return k
        self._switch_off()
        return 0

    def _switch_off(self) -> None:
        self.on, self.idle, self.gains = False, 0, []

    def record(self, drafted: int, kept: int, seconds: float, empty: bool = False, resync: float = 0.0) -> None:
        """One step: `drafted` guesses checked (0: a plain step), `kept` of them accepted, in `seconds`. `empty`: a
        draft was asked for and the draft model gave none (unsure of its first guess): a plain step plus the
        drafting, booked as a check that gained nothing, not as a plain step's time. `resync`: the draft's
        catch-up before this check (left out of `seconds`, so step times by length stay comparable), charged to
        the check's gain: a probe after a long stretch off pays for it."""
        if not empty:
            old = self.seconds.get(drafted)
            self.seconds[drafted] = seconds if old is None else 0.7 * old + 0.3 * seconds
        if not (drafted or empty) or 0 not in self.seconds:
            return
        m = self.measured
        if drafted:
            m.kept = self.decay * m.kept + kept
            m.missed = self.decay * m.missed + (kept < drafted)
        # what this check's tokens cost plain, less its own
        gain = (kept + 1) * self.seconds[0] - (seconds if empty else self.seconds[drafted]) - resync
        if not self.on:  # a probe: on again if it paid, else the next one comes later
            self.on = gain > 0
            self.gains = [gain] if self.on else []
            m.interval = self.probe if self.on else min(self.interval * 2, 16 * self.probe)
        else:
            self.gains.append(gain)
            if self.patience and len(self.gains) >= self.patience and sum(self.gains[-self.patience:]) < 0:
                self._switch_off()


class Speculator:
    """A sequence's speculation: its proposer and its draft length (fixed, or a `DraftLength`).

    `drafts_with_aux`: the proposer drafts with KV Prediction's aux model, whose prompt cache the predictor fills.
    """

    def __init__(self, proposer: Proposer, k: int, adaptive: bool = True, drafts_with_aux: bool = False,
                 measured: Measured | None = None, probe: int = 32, patience: int | None = 3,
                 margin: float = 0.05) -> None:
        self.proposer, self.k, self.drafts_with_aux = proposer, k, drafts_with_aux
        self.length = DraftLength(k, probe=probe, patience=patience, margin=margin, measured=measured) \
            if adaptive else None

    def begin(self, prompt: list[int]) -> None:
        """At the end of the prompt's prefill: a draft model runs it too (the aux already holds it), unless what
        earlier requests measured says drafting does not pay (a probe then catches up on a window)."""
        if isinstance(self.proposer, DraftModelProposer) and not self.drafts_with_aux and \
                (self.length is None or self.length.promising()):
            self.proposer.prefill(prompt)

    def choose(self) -> int:
        return self.k if self.length is None else self.length.choose()

    def record(self, asked: int, drafted: int, kept: int, seconds: float) -> None:
        """A step as `DraftLength` should see it: without the proposer's catch-up after a stretch off, and a draft
        model's empty draft (`asked` > 0, `drafted` 0) as what it is: drafting that gave nothing to check. (Prompt
        lookup finds no match for free: that step is a plain one.)"""
        resync, self.proposer.resync_seconds = self.proposer.resync_seconds, 0.0
        if self.length is not None:
            empty = bool(asked) and not drafted and isinstance(self.proposer, DraftModelProposer)
            self.length.record(drafted, kept, seconds - resync, empty, resync)


def make_speculator(speculate: int | Speculation, sampling: SamplingParams | None, capacity: int,
                    draft_model: nn.Module | None = None, kv_predictor: nn.Module | None = None) -> Speculator | None:
    """The speculator a request asks for: an int k is prompt lookup with a fixed draft length k (0: none); a
    `Speculation` names the mode. `capacity`: tokens a draft model's cache should hold (prompt + answer + draft).
    Prompt lookup drafts for free: a check that misses costs only a slightly longer pass and a run of misses is
    often followed by a long copy, so it goes by the expected gain alone (no losing streak, no margin) and probes
    every 8 steps while off; a draft model's checks also run the draft, so losing ones turn it off, it drafts only
    when expected to beat plain decoding by 5%, and it probes every 32."""
    if isinstance(speculate, int):
        if speculate < 0:
            raise InvalidRequestError(f"speculate is a draft length (0 = off), got {speculate}")
        return Speculator(NGramProposer(), speculate, adaptive=False) if speculate else None
    spec = speculate.validate()
    if spec.mode == "ngram":
        return Speculator(NGramProposer(), spec.k, spec.adaptive, measured=spec.measured, probe=8, patience=None,
                          margin=0.0)
    if spec.mode == "draft":
        if draft_model is None:
            raise InvalidRequestError("speculative mode 'draft' needs a draft model (--draft-model DIR)")
        return Speculator(DraftModelProposer(draft_model, capacity, sampling, p_min=spec.p_min), spec.k,
                          spec.adaptive, measured=spec.measured)
    if kv_predictor is None:
        raise InvalidRequestError("speculative mode 'kvpred' drafts with a KV predictor's aux model; give one "
                                  "(--kv-predictor DIR)")
    return Speculator(DraftModelProposer(kv_predictor.aux, capacity, sampling, p_min=spec.p_min), spec.k,
                      spec.adaptive, drafts_with_aux=True, measured=spec.measured)

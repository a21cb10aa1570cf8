"""Prompt-lookup speculative decoding: greedy output identical to plain decoding, sampled output with plain sampling's
distribution, with the drafts actually used."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from edgellm import PromptCache, SamplingParams, generate, load, runner, stream_generate
from edgellm.cli import main
from edgellm.errors import InvalidRequestError
from edgellm.kv import KVFormat
from edgellm.sampling import Sampler, filter_logits
from edgellm.sequence import Sequence
from edgellm.speculative import NGramProposer

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 3


@pytest.fixture(scope="module")
def engine(llama_dir):
    model, tok = load(llama_dir, "fp32")
    tok.eos_token_ids = set()  # random weights: never stop early, so lengths are predictable
    return model, tok


def test_ngram_proposer_follows_the_latest_longest_match():
    p = NGramProposer(max_ngram=3)
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3], 2) == [4, 1]  # the latest 3-gram match, not the first
    assert p.propose([5, 6, 7, 5, 6], 3) == [7, 5, 6]
    assert p.propose([1, 2, 9, 1, 2], 5) == [9, 1, 2, 9, 1]  # past the context's end the guess repeats itself
    assert p.propose([8, 8], 3) == [8, 8, 8]
    assert p.propose([1, 2, 3], 4) == [] and p.propose([7], 2) == [] and p.propose([], 2) == []
    assert NGramProposer(max_ngram=2, min_ngram=2).propose([3, 1, 4, 1], 2) == []  # only a 1-gram matches
    with pytest.raises(ValueError):
        NGramProposer(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("kv", [None, "q4"])
def test_greedy_speculation_matches_plain_decoding(engine, kv):
    model, tok = engine

    def run(speculate):
        cache = PromptCache(model, 64 if kv else 256, KVFormat.parse(kv) if kv else None)
        return generate(model, tok, PROMPT, 60, prompt_cache=cache, speculate=speculate), cache

    (plain, _), (fast, cache) = run(0), run(4)
    assert fast.tokens == plain.tokens and fast.text == plain.text and len(fast.tokens) == 60
    assert fast.stats["accepted_tokens"] > 0 and fast.stats["drafted_tokens"] >= fast.stats["accepted_tokens"]
    ids = tok.encode(PROMPT)
    assert cache.tokens == (ids + fast.tokens)[:-1]  # the last token was picked, not yet run
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)


def test_stop_string_and_length_cut_mid_draft(engine):
    model, tok = engine
    plain = generate(model, tok, PROMPT, 40)
    for max_tokens in (1, 2, 7, 13):
        fast = generate(model, tok, PROMPT, max_tokens, speculate=8)
        assert fast.tokens == plain.tokens[:max_tokens] and fast.finish_reason == "length"
    stop = plain.text[len(plain.text) // 2:][:3]
    cut = generate(model, tok, PROMPT, 40, stop=[stop])
    fast = generate(model, tok, PROMPT, 40, stop=[stop], speculate=8)
    assert fast.finish_reason == cut.finish_reason == "stop" and fast.text == cut.text and fast.tokens == cut.tokens


def test_stream_matches_generate(engine):
    model, tok = engine
    full = generate(model, tok, PROMPT, 30, speculate=4)
    steps = list(stream_generate(model, tok, PROMPT, 30, speculate=4))
    assert [s.token for s in steps] == full.tokens and "".join(s.text for s in steps) == full.text
    assert [s.generation_tokens for s in steps] == list(range(1, 31))
    assert steps[-1].accepted_tokens == full.stats["accepted_tokens"] > 0


def test_negative_speculate_is_rejected(engine):
    model, tok = engine
    with pytest.raises(InvalidRequestError):
        generate(model, tok, PROMPT, 4, speculate=-1)


class Oracle:
    """Proposes the known greedy continuation with every third guess wrong: both accepted and rejected drafts."""

    def __init__(self, prompt: list[int], answer: list[int]) -> None:
        self.prompt, self.answer = prompt, answer

    def propose(self, tokens: list[int], k: int) -> list[int]:
        done = len(tokens) - len(self.prompt)
        guess = self.answer[done:done + k]
        return [t if (done + i) % 3 else (t + 1) % 300 for i, t in enumerate(guess)]


@pytest.mark.parametrize("kv", [None, "q4"])
def test_rejected_drafts_are_trimmed_from_the_cache(engine, kv):
    model, tok = engine
    fmt = KVFormat.parse(kv) if kv else None
    ids = tok.encode("import os\nimport sys\n")
    plain = generate(model, tok, ids, 40, prompt_cache=PromptCache(model, 64, fmt))
    cache = PromptCache(model, 64, fmt)
    seq = Sequence(model, tok, ids, cache, 40)
    runner.prefill(model, [seq])
    oracle = Oracle(ids, plain.tokens)
    while not seq.finished:
        runner.speculative_decode(model, seq, oracle, 5)
    assert seq.generated == plain.tokens
    assert 0 < seq.accepted < seq.drafted
    assert cache.tokens == (ids + seq.generated)[:-1]
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)


def test_cli_speculate_flag(llama_dir, capsys):
    def run(*extra):
        assert main(["generate", "--model", str(llama_dir), "--dtype", "fp32", "--prompt", PROMPT, "--max-tokens",
                     "24", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain, fast = run(), run("--speculate", "4")
    assert fast["tokens"] == plain["tokens"] and plain["drafted_tokens"] == 0


# The random test model's logits are nearly flat: a low temperature and top-k give it a few likely tokens, so drafts
# of the likeliest token are kept often and rejected often.
SHARP = {"temperature": 0.05, "top_k": 4}


def chi2_critical(df: int, z: float = 3.72) -> float:
    """The chi-square quantile at the normal quantile `z` (3.72: significance 1e-4), by Wilson–Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def homogeneity_chi2(a: Counter, b: Counter) -> tuple[float, int]:
    """Two-sample chi-square statistic and degrees of freedom; cells expecting under 5 in an arm are pooled."""
    na, nb = sum(a.values()), sum(b.values())
    cells, small = [], [0, 0]
    for key in set(a) | set(b):
        if (a[key] + b[key]) * min(na, nb) / (na + nb) < 5:
            small[0], small[1] = small[0] + a[key], small[1] + b[key]
        else:
            cells.append((a[key], b[key]))
    if sum(small):
        cells.append(tuple(small))
    stat = 0.0
    for x, y in cells:
        for observed, n in ((x, na), (y, nb)):
            expected = n * (x + y) / (na + nb)
            stat += (observed - expected) ** 2 / expected
    return stat, len(cells) - 1


def test_verify_draws_from_the_target_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])
    params = SamplingParams(temperature=1.0, top_k=5, seed=0)
    target = filter_logits(logits, top_k=5).softmax(-1)
    n = 4000
    for draft in (0, 3, 5):  # the likeliest token, an unlikely one, one top-k removed (always rejected)
        sampler = Sampler(params)
        drawn = Counter(sampler.verify(logits, None, draft) for _ in range(n))
        assert drawn[5] == 0
        stat = sum((drawn[t] - n * p) ** 2 / (n * p) for t, p in enumerate(target.tolist()) if p > 0)
        assert stat < chi2_critical(4), (draft, drawn)


class GreedyOracle:
    """Drafts the greedy continuation: the likeliest tokens, so drafts are kept often and rejected often."""

    def __init__(self, model, tok) -> None:
        self.model, self.tok = model, tok
        self.known: dict[tuple[int, ...], list[int]] = {}

    def propose(self, tokens: list[int], k: int) -> list[int]:
        key = (*tokens, k)
        if key not in self.known:
            self.known[key] = generate(self.model, self.tok, tokens, k).tokens
        return self.known[key]


@pytest.fixture
def one_thread():
    """Hundreds of tiny-model runs: on one thread each costs ~1 ms, on a busy pool up to 100x that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def first_tokens(engine, seeds: range, speculate: bool) -> Counter:
    """How often each first three tokens came out over `seeds`, sampled plainly or with 2 drafts checked a step."""
    model, tok = engine
    ids, cache, oracle = tok.encode(PROMPT), PromptCache(model, 128), GreedyOracle(model, tok)
    counts: Counter = Counter()
    for seed in seeds:
        seq = Sequence(model, tok, ids, cache, 4 if speculate else 3, SamplingParams(**SHARP, seed=seed))
        runner.prefill(model, [seq])
        while len(seq.generated) < 3:
            runner.speculative_decode(model, seq, oracle, 2) if speculate else runner.decode(model, [seq])
        counts[tuple(seq.generated[:3])] += 1
    return counts


def test_sampled_speculation_matches_plain_sampling_in_distribution(engine, monkeypatch, one_thread):
    """A two-sample chi-square test over the first three tokens (two of them verified drafts) at significance 1e-4;
    the same test tells a subtly wrong rule (on rejection, redraw from all of p) from the right one."""
    plain = first_tokens(engine, range(700), speculate=False)
    fast = first_tokens(engine, range(10_000, 10_700), speculate=True)
    stat, df = homogeneity_chi2(plain, fast)
    assert stat < chi2_critical(df), (stat, df)

    def redraw_from_all(self, logits, tokens, draft, draft_probs=None):
        kept = filter_logits(logits.float() / SHARP["temperature"], SHARP["top_k"]).softmax(-1)[draft]
        return draft if torch.rand(()) < kept else self(logits, tokens)

    torch.manual_seed(0)
    monkeypatch.setattr(Sampler, "verify", redraw_from_all)
    wrong = first_tokens(engine, range(20_000, 20_400), speculate=True)
    stat, df = homogeneity_chi2(plain, wrong)
    assert stat > chi2_critical(df), (stat, df)


def test_seeded_sampled_speculation_is_reproducible(engine):
    model, tok = engine
    params = SamplingParams(**SHARP, seed=7)
    first, again = (generate(model, tok, PROMPT, 40, params, speculate=4) for _ in range(2))
    assert first.tokens == again.tokens and first.stats == again.stats
    assert first.stats["accepted_tokens"] > 0 and first.stats["drafted_tokens"] > first.stats["accepted_tokens"]
    other = generate(model, tok, PROMPT, 40, SamplingParams(**SHARP, seed=8), speculate=4)
    assert other.tokens != first.tokens


def test_sampled_stop_string_and_length_cut_mid_draft(engine):
    model, tok = engine
    ids = tok.encode(PROMPT)
    for max_tokens in (1, 2, 7, 13):
        cache = PromptCache(model, 128)
        out = generate(model, tok, ids, max_tokens, SamplingParams(**SHARP, seed=3), prompt_cache=cache, speculate=8)
        assert len(out.tokens) == max_tokens and out.finish_reason == "length"
        assert cache.tokens == (ids + out.tokens)[:-1]
    params = SamplingParams(**SHARP, seed=5)
    full = generate(model, tok, ids, 40, params, speculate=8)  # the same seed and length draw the same tokens...
    for stop in {full.text[i:i + 2] for i in range(5, len(full.text) - 2, 7)}:
        cache = PromptCache(model, 128)
        cut = generate(model, tok, ids, 40, params, stop=[stop], prompt_cache=cache, speculate=8)
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]  # ...up to the stop
        assert cut.tokens == full.tokens[:len(cut.tokens)] and cache.tokens == (ids + cut.tokens)[:-1]

"""Prompt-lookup speculative decoding: greedy output identical to plain decoding, with the drafts actually used."""

from __future__ import annotations

import json

import pytest

from edgellm import PromptCache, SamplingParams, generate, load, runner, stream_generate
from edgellm.cli import main
from edgellm.errors import InvalidRequestError
from edgellm.kv import KVFormat
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


def test_sampled_requests_decode_plainly(engine):
    model, tok = engine
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    plain = generate(model, tok, PROMPT, 24, params)
    fast = generate(model, tok, PROMPT, 24, params, speculate=4)
    assert fast.tokens == plain.tokens and "drafted_tokens" not in fast.stats


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
    assert main(["generate", "--model", str(llama_dir), "--prompt", "x", "--agent", "a", "--speculate", "2"]) != 0
    assert "--speculate" in capsys.readouterr().err

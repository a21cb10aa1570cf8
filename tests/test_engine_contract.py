"""One table of requests through every entry point: generate, stream_generate, batch_generate and the server's
engine must agree on tokens, text, finish reason and usage, since they share one per-token step and one runner."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from edgellm import load, runner
from edgellm.agents import AgentStore
from edgellm.errors import InvalidRequestError
from edgellm.generate import _result, batch_generate, generate, stream_generate
from edgellm.kv.prompt_cache import PromptCache
from edgellm.kvpred import KVPredictor
from edgellm.kvpred.train import trainable_copy
from edgellm.sampling import SamplingParams
from edgellm.sequence import Sequence, StopStringMatcher
from edgellm.serve.metrics import ServerMetrics
from edgellm.serve.scheduler import Engine, GenerationRequest

PROMPT = "def fibonacci(n):\n    return n if n < 2 else"


@dataclass
class Case:
    name: str
    max_tokens: int = 10
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    eos_at: int | None = None  # make the greedy token at this position an EOS token
    cached_prefix: bool = False  # the cache already holds the prompt's first tokens (an agent's memory)
    predictor: bool = False


CASES = [
    Case("greedy"),
    Case("seeded", 12, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7)),
    Case("penalties", 12, SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5,
                                         frequency_penalty=0.7, seed=3)),
    Case("stop", 16, stop=["<from-greedy>"]),
    Case("eos", 16, eos_at=3),
    Case("one-token", 1),
    Case("cached-prefix", 8, cached_prefix=True),
    Case("kv-predictor", 8, predictor=True),
]


@dataclass
class Outcome:
    tokens: list[int]
    text: str
    finish: str
    usage: tuple[int, int, int]  # prompt, completion, cached


@pytest.fixture(scope="module")
def engine_parts(llama_dir):
    model, tok = load(llama_dir, "fp32")
    tok.eos_token_ids = set()
    torch.manual_seed(0)
    predictor = KVPredictor(trainable_copy(model), model.args, list(range(model.args.num_hidden_layers)),
                            {"base_fingerprint": model.fingerprint})
    predictor.init_identity()
    with torch.no_grad():  # a predictor that is not exact: its K/V change the output, so it must be applied
        for p in predictor.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, tok, predictor.eval().requires_grad_(False)


def resolve(case: Case, model, tok) -> tuple[list[int], list[str], set[int]]:
    """Prompt ids, stop strings and EOS ids of a case, derived from the plain greedy continuation."""
    ids = tok.encode(PROMPT)
    greedy = generate(model, tok, ids, 16)
    stop = case.stop
    if stop == ["<from-greedy>"]:
        stop = [greedy.text[len(greedy.text) // 2:][:3]]
    eos = {greedy.tokens[case.eos_at]} if case.eos_at is not None else set()
    return ids, stop, eos


def fresh_cache(model, tok, case: Case, ids: list[int]) -> PromptCache:
    cache = PromptCache(model, 64)
    if case.cached_prefix:
        generate(model, tok, ids[:8], 1, prompt_cache=cache)  # holds ids[:8] and one generated token
    return cache


def via_generate(model, tok, case, ids, stop, predictor) -> Outcome:
    r = generate(model, tok, ids, case.max_tokens, case.sampling, stop, fresh_cache(model, tok, case, ids), predictor)
    return Outcome(r.tokens, r.text, r.finish_reason, (r.prompt_tokens, len(r.tokens), r.cached_tokens))


def via_stream(model, tok, case, ids, stop, predictor) -> Outcome:
    steps = list(stream_generate(model, tok, ids, case.max_tokens, case.sampling, stop,
                                 fresh_cache(model, tok, case, ids), predictor))
    last = steps[-1]
    assert all(s.finish_reason is None for s in steps[:-1])
    return Outcome([s.token for s in steps], "".join(s.text for s in steps), last.finish_reason,
                   (last.prompt_tokens, last.generation_tokens, last.cached_tokens))


def via_batch(model, tok, case, ids, stop, predictor) -> Outcome:
    other = tok.encode("import os\nimport sys")  # a second sequence in the same batch
    results = batch_generate(model, tok, [ids, other], case.max_tokens, [case.sampling, SamplingParams()], stop,
                             [fresh_cache(model, tok, case, ids), PromptCache(model, 64)], predictor)
    r = results[0]
    return Outcome(r.tokens, r.text, r.finish_reason, (r.prompt_tokens, len(r.tokens), r.cached_tokens))


def via_engine(model, tok, case, ids, stop, predictor, tmp_path) -> Outcome:
    store = AgentStore(tmp_path / case.name, model, tok)
    engine = Engine(model, tok, store, ServerMetrics(), prefill_chunk=5, kv_predictor=predictor)
    loop = asyncio.new_event_loop()
    try:
        if case.cached_prefix:  # the agent's memory holds the first 8 prompt tokens, as a previous turn left it
            store.agent("a").cache = fresh_cache(model, tok, case, ids)
        other = GenerationRequest(tok.encode("import os\nimport sys"), case.max_tokens, SamplingParams(), loop)
        req = GenerationRequest(ids, case.max_tokens, case.sampling, loop, stop=list(stop),
                                agent="a" if case.cached_prefix else None, kv_prediction=predictor is not None)
        engine.submit(other)
        engine.submit(req)
        events = []
        while not events or (events[-1].finish is None and events[-1].error is None):
            engine.step()
            loop.run_until_complete(asyncio.sleep(0))
            while not req.events.empty():
                events.append(req.events.get_nowait())
        assert events[-1].error is None, events[-1].error
        return Outcome([], "".join(e.text for e in events), events[-1].finish, events[-1].usage)
    finally:
        loop.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_entry_point_agrees(engine_parts, case, tmp_path):
    model, tok, predictor = engine_parts
    ids, stop, eos = resolve(case, model, tok)
    tok.eos_token_ids = eos
    try:
        pred = predictor if case.predictor else None
        reference = via_generate(model, tok, case, ids, stop, pred)
        for other in (via_stream(model, tok, case, ids, stop, pred), via_batch(model, tok, case, ids, stop, pred)):
            assert other == reference
        served = via_engine(model, tok, case, ids, stop, pred, tmp_path)
        assert (served.text, served.finish, served.usage) == (reference.text, reference.finish, reference.usage)
    finally:
        tok.eos_token_ids = set()
    expected_finish = "stop" if case.stop or case.eos_at is not None else "length"
    assert reference.finish == expected_finish
    if case.cached_prefix:
        assert reference.usage[2] == 8
    if case.predictor:  # the predicted K/V changed the continuation: the predictor really ran in every path
        assert reference.tokens != generate(model, tok, ids, case.max_tokens, case.sampling, stop).tokens


def test_stop_string_completed_by_the_final_flush_stops(engine_parts):
    """The detokenizer holds back a partial UTF-8 character; at the length limit, the flushed tail can complete a
    stop string. Every path reports "stop" (the server's and batch_generate's copies used to say "length")."""
    model, tok, _ = engine_parts
    ids = tok.encode(PROMPT)
    seq = Sequence(model, tok, ids, PromptCache(model, 64), 2, stop=["\ufffd"])
    seq.begin()
    byte_ids = tok.encode("語", add_special_tokens=False)  # unseen in training: one token per UTF-8 byte
    assert len(byte_ids) == 3
    vocab = model.args.vocab_size
    first = seq.advance(torch.nn.functional.one_hot(torch.tensor(byte_ids[0]), vocab).float())
    assert first.text == "" and first.finish_reason is None  # an incomplete character is held back
    last = seq.advance(torch.nn.functional.one_hot(torch.tensor(byte_ids[1]), vocab).float())
    assert last.finish_reason == "stop" and last.text == ""


def test_stop_matcher_holds_back_a_partial_stop():
    stops = StopStringMatcher(["END"])
    assert stops.feed("abcE") == ("abc", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("D tail") == ("", True)


def test_a_failing_step_ends_only_its_own_sequence(engine_parts):
    """A sequence whose sampling chain raises (e.g. a grammar in an error state) finishes with "error"; the other
    sequences of the same batched step carry on exactly as without it, and `generate` reports the error."""
    model, tok, _ = engine_parts
    ids = tok.encode(PROMPT)
    alone = generate(model, tok, ids, 6).tokens

    def make() -> Sequence:
        return Sequence(model, tok, ids, PromptCache(model, 64), 6)

    good, bad = make(), make()
    runner.prefill(model, [good, bad])

    def broken(logits, tokens=None):
        raise InvalidRequestError("grammar rejected every token")

    bad.sampler = broken  # the chain is called as sampler(logits, tokens)
    outputs = runner.decode(model, [bad, good])
    assert outputs[0].finish_reason == "error" and bad.finished and isinstance(bad.error, InvalidRequestError)
    runner.run_to_completion(model, [good])
    assert good.generated == alone
    with pytest.raises(InvalidRequestError, match="grammar rejected"):
        _result(bad)  # what generate() returns for a finished sequence

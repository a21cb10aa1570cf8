"""Draft-model and KV-Prediction-aux speculation, and the adaptive draft length: greedy output identical to plain
decoding (or to KV Prediction alone), sampled output with plain sampling's distribution (min(1, p/q) rule)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from itertools import pairwise

import pytest
import torch

from edgellm import PromptCache, SamplingParams, generate, load, runner
from edgellm.agents import AgentStore
from edgellm.assets import default_model_path
from edgellm.cli import main
from edgellm.errors import InvalidRequestError
from edgellm.kv import KVFormat
from edgellm.kvpred import KVPredictor, default_layer_map
from edgellm.kvpred.predictor import prune_model
from edgellm.sampling import Sampler, filter_logits
from edgellm.sequence import Sequence
from edgellm.speculative import (
    DraftLength,
    DraftModelProposer,
    Measured,
    Speculation,
    Speculator,
    make_speculator,
)
from tests.test_speculative import PROMPT, SHARP, chi2_critical, homogeneity_chi2, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(llama_dir):
    model, tok = load(llama_dir, "fp32")
    tok.eos_token_ids = set()  # random weights: never stop early, so lengths are predictable
    return model, tok


def noisy_copy(path, scale: float):
    """The model with its output head perturbed: a draft that agrees with it often but not always."""
    draft, _ = load(path, "fp32")
    torch.manual_seed(1)
    with torch.no_grad():
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight) * scale * draft.lm_head.weight.std())
    return draft


@pytest.fixture(scope="module")
def draft(llama_dir):
    return noisy_copy(llama_dir, 1.0)


@pytest.mark.parametrize("kv", [None, "q4"])
def test_greedy_draft_model_speculation_matches_plain_decoding(engine, draft, kv):
    model, tok = engine

    def run(**spec):
        cache = PromptCache(model, 64 if kv else 256, KVFormat.parse(kv) if kv else None)
        return generate(model, tok, PROMPT, 60, prompt_cache=cache, **spec), cache

    (plain, _), (fast, cache) = run(), run(speculate=Speculation("draft", 5, adaptive=False), draft_model=draft)
    assert fast.tokens == plain.tokens and fast.text == plain.text
    assert 0 < fast.stats["accepted_tokens"] < fast.stats["drafted_tokens"]  # kept and rejected drafts
    ids = tok.encode(PROMPT)
    assert cache.tokens == (ids + fast.tokens)[:-1]
    assert all(layer.offset == len(cache.tokens) for layer in cache.layers)


def test_draft_model_stops_at_an_unsure_guess(engine, draft):
    """With p_min, drafting stops before the first guess whose probability under the draft (a full forward pass of
    the draft over the context, the reference) is below p_min; greedy output stays plain decoding's."""
    model, tok = engine
    ids = tok.encode(PROMPT)

    def proposer(p_min: float = 0.0) -> DraftModelProposer:
        made = DraftModelProposer(draft, 256, p_min=p_min)
        made.prefill(ids)  # as `Speculator.begin` does: the draft conditions on the whole prompt
        return made

    guesses = proposer().propose(ids, 6)
    with torch.no_grad():
        probs = draft(torch.tensor([ids + guesses[:-1]]))[0, len(ids) - 1:].softmax(-1).max(-1).values.tolist()
    # the cut with the widest margin: guess `stop` less sure than every earlier one, p_min between them
    stop = max(range(1, len(probs)), key=lambda i: min(probs[:i]) / probs[i])
    p_min = (min(probs[:stop]) + probs[stop]) / 2
    assert min(probs[:stop]) / probs[stop] > 1.05  # far from a tie that rounding could flip
    assert proposer(p_min).propose(ids, 6) == guesses[:stop]
    assert proposer(0.999).propose(ids, 6) == []

    plain = generate(model, tok, PROMPT, 40)
    fast = generate(model, tok, PROMPT, 40, speculate=Speculation("draft", 5, adaptive=False, p_min=p_min),
                    draft_model=draft)
    assert fast.tokens == plain.tokens
    assert fast.stats["drafted_tokens"] < 5 * fast.stats["verify_steps"]  # some drafts cut short
    with pytest.raises(InvalidRequestError, match="p_min"):
        Speculation("draft", p_min=1.0).validate()


def test_an_empty_draft_is_booked_as_a_check_that_gained_nothing():
    """A draft model unsure of its first guess drafts nothing: that step's time (a plain step plus drafting) is
    not taken for a plain step's, and steps like it count towards turning drafting off."""
    length = DraftLength(4, patience=3)
    length.record(0, 0, 1.0)
    for _ in range(3):
        length.record(0, 0, 1.4, empty=True)
    assert length.seconds == {0: 1.0} and not length.on


def test_draft_cache_follows_the_accepted_tokens(engine, draft):
    model, tok = engine
    ids = tok.encode(PROMPT)
    proposer = DraftModelProposer(draft, 256)
    seq = Sequence(model, tok, ids, PromptCache(model, 256), 30, speculator=Speculator(proposer, 4, adaptive=False))
    runner.prefill(model, [seq])
    while not seq.finished:
        runner.speculative_step(model, seq)
        context = (ids + seq.generated)[proposer.start:]
        held = proposer.cache.tokens
        assert context[:len(held) - 3] == held[:-3]  # at most the last step's unverified drafts differ
    proposer.propose(ids + seq.generated, 1)  # the next proposal trims what the model rejected
    assert proposer.cache.tokens == (ids + seq.generated)[proposer.start:]
    assert all(layer.offset == len(proposer.cache.tokens) for layer in proposer.cache.layers)


def test_draft_model_runs_the_prompt_with_the_prefill(engine, draft):
    """The prompt's prefill runs the draft over it too: the first draft needs no catch-up, and greedy output stays
    plain decoding's."""
    model, tok = engine
    ids = tok.encode(PROMPT)
    seq = Sequence(model, tok, ids, PromptCache(model, 256), 30,
                   speculator=make_speculator(Speculation("draft", 4), None, 256, draft_model=draft))
    runner.prefill(model, [seq])
    proposer = seq.speculator.proposer
    assert proposer.cache.tokens == ids[:-1] and proposer.start == 0
    proposer.propose(ids + seq.generated, 2)
    assert proposer.resync_seconds == 0.0  # only the last prompt token and the first answer token were left
    while not seq.finished:
        runner.speculative_step(model, seq)
    assert seq.generated == generate(model, tok, ids, 30).tokens and seq.drafted > 0


def test_draft_cache_catches_up_on_a_window_of_the_context(engine, draft):
    """Far behind (a long prompt, a stretch with drafting off), the draft restarts on the last `window` tokens: the
    catch-up is bounded, and greedy output stays plain decoding's."""
    model, tok = engine
    ids = tok.encode(PROMPT)
    proposer = DraftModelProposer(draft, 256, window=8)
    assert len(ids) > 8
    proposer.propose(ids, 2)
    assert proposer.start == len(ids) - 8 and proposer.cache.tokens[:8] == ids[-8:]
    assert proposer.resync_seconds  # recorded: a catch-up of more than a step's tokens, for the speculator to set aside
    plain = generate(model, tok, ids, 30)
    fast = generate(model, tok, ids, 30, speculate=Speculation("draft", 4, adaptive=False), draft_model=draft)
    assert fast.tokens == plain.tokens
    seq = Sequence(model, tok, ids, PromptCache(model, 256), 40,
                   speculator=Speculator(DraftModelProposer(draft, 256, window=8), 3))
    runner.prefill(model, [seq])
    while not seq.finished:
        runner.speculative_step(model, seq)
    assert seq.generated == generate(model, tok, ids, 40).tokens


def test_verify_with_a_draft_distribution_draws_from_the_target():
    """Drafts drawn from q: the min(1, p/q) rule draws from p and keeps sum(min(p, q)) of them, more than the
    rule for certain drafts keeps (sum(q·p), also exact); redrawing from all of p on rejection is caught."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])
    target = filter_logits(logits, top_k=5).softmax(-1)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=5, seed=0))
    gen = torch.Generator().manual_seed(1)
    n = 6000

    def chi2(drawn: Counter) -> float:
        return sum((drawn[t] - n * p) ** 2 / (n * p) for t, p in enumerate(target.tolist()) if p > 0)

    for q in (torch.tensor([0.1, 0.1, 0.1, 0.6, 0.05, 0.05]), target.roll(1)):  # q far from p, q moved one over
        drafts = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
        picks = [sampler.verify(logits, None, d, q) for d in drafts]
        assert Counter(picks)[5] == 0 and chi2(Counter(picks)) < chi2_critical(4), (q, Counter(picks))
        kept = sum(a == b for a, b in zip(picks, drafts, strict=True)) / n
        assert abs(kept - float(torch.minimum(target, q).sum())) < 0.03
        certain = [sampler.verify(logits, None, d) for d in drafts]
        assert chi2(Counter(certain)) < chi2_critical(4)
        assert sum(a == b for a, b in zip(certain, drafts, strict=True)) / n < kept - 0.05
        redraw = [d if float(torch.rand((), generator=gen)) * q[d] < target[d] else int(torch.multinomial(
            target, 1, generator=gen)) for d in drafts]
        assert chi2(Counter(redraw)) > chi2_critical(4)


def first_tokens(engine, draft, seeds: range, speculate: bool) -> Counter:
    """How often each first three tokens came out over `seeds`, plainly or with 2 sampled drafts checked a step."""
    model, tok = engine
    ids, cache = tok.encode(PROMPT), PromptCache(model, 128)
    counts: Counter = Counter()
    for seed in seeds:
        params = SamplingParams(**SHARP, seed=seed)
        spec = Speculator(DraftModelProposer(draft, 128, params), 2, adaptive=False) if speculate else None
        seq = Sequence(model, tok, ids, cache, 4 if speculate else 3, params, speculator=spec)
        runner.prefill(model, [seq])
        while len(seq.generated) < 3:
            runner.speculative_step(model, seq) if speculate else runner.decode(model, [seq])
        counts[tuple(seq.generated[:3])] += 1
    return counts


def test_sampled_draft_model_speculation_matches_plain_sampling_in_distribution(engine, llama_dir):
    """A two-sample chi-square test over the first three tokens (two of them verified sampled drafts), at
    significance 1e-4; the draft's distribution is close to the model's but not equal, so drafts are kept
    and rejected."""
    draft = noisy_copy(llama_dir, 0.3)
    plain = first_tokens(engine, draft, range(600), speculate=False)
    fast = first_tokens(engine, draft, range(10_000, 10_600), speculate=True)
    stat, df = homogeneity_chi2(plain, fast)
    assert stat < chi2_critical(df), (stat, df)


def test_seeded_sampled_draft_speculation_is_reproducible(engine, draft):
    model, tok = engine
    spec = Speculation("draft", 4, adaptive=False)
    first, again = (generate(model, tok, PROMPT, 30, SamplingParams(**SHARP, seed=7), speculate=spec,
                             draft_model=draft) for _ in range(2))
    assert first.tokens == again.tokens and first.stats == again.stats and first.stats["drafted_tokens"] > 0


def pruned_predictor(base) -> KVPredictor:
    """A half-depth aux (untrained maps): predicted K/V that differ from the base's, and an aux that drafts."""
    aux, _ = prune_model(base, 0.5)
    predictor = KVPredictor(aux, base.args, default_layer_map(aux.args.num_hidden_layers, base.args.num_hidden_layers))
    predictor.init_identity()
    return predictor.eval().requires_grad_(False)


def test_kv_predictor_aux_drafts_from_its_prompt_cache(engine):
    model, tok = engine
    predictor = pruned_predictor(model)
    ids = tok.encode(PROMPT)
    alone = generate(model, tok, ids, 40, kv_predictor=predictor)
    spec = Speculation("kvpred", 4, adaptive=False)
    fast = generate(model, tok, ids, 40, kv_predictor=predictor, speculate=spec)
    assert fast.tokens == alone.tokens and fast.stats["predicted_tokens"] == len(ids) - 1
    assert fast.stats["accepted_tokens"] > 0
    seq = Sequence(model, tok, ids, PromptCache(model, 256), 8, kv_predictor=predictor,
                   speculator=make_speculator(spec, None, 256, kv_predictor=predictor))
    runner.prefill(model, [seq])
    assert seq.speculator.proposer.cache.tokens == ids[:-1]  # filled by the prediction: no prefill of its own


def test_speculation_modes_refuse_what_they_lack():
    for spec, message in ((Speculation("draft"), "draft model"), (Speculation("kvpred"), "KV predictor"),
                          (Speculation("tree"), "one of ngram"), (Speculation("ngram", 0), "from 1 to 64")):
        with pytest.raises(InvalidRequestError, match=message):
            make_speculator(spec, None, 64)


def drive(length: DraftLength, steps: int, kept: Callable[[int], int], draft_cost: float = 0.3) -> list[int]:
    """`steps` steps of a request: a plain step costs 1 s, a check of k drafts 1 + `draft_cost` * k s (the
    drafting, the verify pass); returns the draft lengths chosen."""
    picks = []
    for _ in range(steps):
        k = length.choose()
        picks.append(k)
        length.record(k, min(k, kept(k)), 1.0 + draft_cost * k if k else 1.0)
    return picks


def test_draft_length_turns_speculation_off_after_checks_that_do_not_pay():
    length = DraftLength(8, probe=4, patience=3)
    picks = drive(length, 200, kept=lambda k: 0)  # drafts never kept
    assert picks[0] == 0 and picks[1] == DraftLength.PROBE_K  # a plain step to book checks on, a short first draft
    assert not length.on
    checks = [i for i, k in enumerate(picks) if k]
    first = [i for i in checks if i <= 4]
    assert 1 <= len(first) <= 3  # off after at most 3 losing checks (as soon as the expected gain is none)
    probes = checks[len(first):]
    assert max(picks[i] for i in probes) <= DraftLength.PROBE_K  # off, with short probes
    gaps = [b - a for a, b in pairwise(probes)]
    assert len(probes) <= 6 and gaps == sorted(gaps) and gaps[-1] >= 4 * gaps[0]  # spaced out exponentially


def test_draft_length_probe_that_pays_turns_speculation_on_again():
    length = DraftLength(8, probe=4)
    drive(length, 30, kept=lambda k: 0)
    assert not length.on
    picks = drive(length, 60, kept=lambda k: k)  # now every draft is kept
    assert length.on and picks[-10:].count(0) <= 1 and max(picks) > DraftLength.PROBE_K


def test_a_probe_pays_for_the_drafts_catch_up():
    """A probe after a stretch off first catches the draft up on the context: a check that would pay on its own
    but not with that catch-up leaves speculation off, the next probe further away."""
    def probed(resync: float) -> tuple[DraftLength, int]:
        length = DraftLength(4, probe=4)
        drive(length, 30, kept=lambda k: 0)
        assert not length.on
        while not (k := length.choose()):
            length.record(0, 0, 1.0)
        before = length.interval
        length.record(k, k, 1.0 + 0.3 * k, resync=resync)  # every draft kept
        return length, before

    assert probed(0.0)[0].on
    costly, before = probed(10.0)
    assert not costly.on and costly.interval == min(2 * before, 16 * costly.probe)


def test_a_later_request_starts_from_what_earlier_ones_measured():
    shared = Measured()
    drive(DraftLength(4, measured=shared), 40, kept=lambda k: 0)
    later = DraftLength(4, measured=shared)
    assert drive(later, 20, kept=lambda k: 0) == [0] * 20  # known not to pay: no check before the first probe
    assert not later.promising()  # so a draft model skips the prompt's prefill (`Speculator.begin`)
    fresh = DraftLength(4)
    assert fresh.promising() and any(drive(fresh, 20, kept=lambda k: 0))


def test_draft_length_grows_with_acceptance():
    length = DraftLength(8)
    length.record(0, 0, 1.0)
    for _ in range(30):  # every draft kept; each drafted token costs 5% of a plain step
        length.record(4, 4, 1.2)
    picks = [length.choose() for _ in range(64)]
    assert picks.count(8) == 62 and picks.count(0) == 2  # on, plain decoding re-timed every 32 steps
    for _ in range(30):  # half the drafts kept
        length.record(4, 1, 1.2)
        length.record(2, 1, 1.1)
    assert 0 < length.choose() < 8


def test_adaptive_ngram_speculation_keeps_greedy_output(engine):
    model, tok = engine
    plain = generate(model, tok, PROMPT, 50)
    fast = generate(model, tok, PROMPT, 50, speculate=Speculation("ngram", 8))
    assert fast.tokens == plain.tokens


def test_cli_draft_model(llama_dir, tmp_path, capsys):
    def run(*extra):
        code = main(["generate", "--model", str(llama_dir), "--dtype", "fp32", "--prompt", PROMPT, "--max-tokens",
                     "16", "--json", *extra])
        return code, capsys.readouterr()

    (_, plain), (code, fast) = run(), run("--draft-model", str(llama_dir), "--speculate", "4")
    assert code == 0
    plain, fast = json.loads(plain.out), json.loads(fast.out)
    assert fast["tokens"] == plain["tokens"] and fast["accepted_tokens"] > 0
    code, out = run("--draft-model", str(default_model_path()), "--speculate", "4")  # another tokenizer
    assert code != 0 and "tokenizer" in out.err and len(out.err.strip().splitlines()) == 1
    code, out = run("--spec-mode", "draft", "--speculate", "4")
    assert code != 0 and "--draft-model" in out.err


def test_saved_agent_memory_holds_no_rejected_draft(engine, draft, tmp_path):
    """q4 memory (rejections trim inside partly filled groups), saved and restored: the accepted tokens only."""
    model, tok = engine
    spec = Speculation("draft", 4, adaptive=False)
    plain = [s.token for s in AgentStore(tmp_path / "plain", model, tok, "q4").agent("a").stream(PROMPT, 30)]
    agent = AgentStore(tmp_path / "spec", model, tok, "q4").agent("a")
    steps = list(agent.stream(PROMPT, 30, speculate=spec, draft_model=draft))
    agent.save()
    assert [s.token for s in steps] == plain and 0 < steps[-1].accepted_tokens < steps[-1].drafted_tokens
    restored = AgentStore(tmp_path / "spec", model, tok, "q4").agent("a")
    assert restored.cache.tokens == tok.encode(PROMPT) + plain[:-1]
    assert all(layer.offset == len(restored.cache.tokens) for layer in restored.cache.layers)

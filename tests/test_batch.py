"""Batched decoding across agents whose caches differ in length and kind: same results as one at a time."""

from __future__ import annotations

import pytest
import torch

from edgellm import PromptCache, SamplingParams, generate, load
from edgellm.generate import batch_generate
from edgellm.kv import KVFormat, batch_layers
from edgellm.runner import prefill_tokens

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\nfor path in sys.path:", "The quick brown fox", "x"]


@pytest.fixture(scope="module")
def engine(llama_dir):
    model, tok = load(llama_dir, "fp32")
    tok.eos_token_ids = set()
    return model, tok


@pytest.mark.parametrize("fmt", [None, "q4-kivi"])
def test_batched_greedy_equals_one_at_a_time(engine, fmt):
    model, tok = engine
    kv = KVFormat.parse(fmt) if fmt else None
    alone = [generate(model, tok, p, 12, prompt_cache=PromptCache(model, 16, kv)).tokens for p in PROMPTS]
    together = batch_generate(model, tok, PROMPTS, 12, prompt_caches=[PromptCache(model, 16, kv) for _ in PROMPTS])
    assert [r.tokens for r in together] == alone
    assert together[0].stats["batch_decode_steps"] == 11


def test_batched_logits_match_per_sequence_logits(engine):
    model, tok = engine
    caches = [PromptCache(model, 32) for _ in PROMPTS]
    last = [prefill_tokens(model, tok.encode(p), c) for p, c in zip(PROMPTS, caches, strict=True)]
    nxt = [int(x.argmax()) for x in last]
    alone = []
    for c, token in zip(caches, nxt, strict=True):
        clone = PromptCache(model, 32)
        clone.layers[0].offset = 0
        for src, dst in zip(c.layers, clone.layers, strict=True):
            dst.load_state(src.state())
        alone.append(model(torch.tensor([[token]]), clone.layers, last_only=True)[0, -1])
    batched = model(torch.tensor([[t] for t in nxt]), batch_layers([c.layers for c in caches]), last_only=True)
    assert torch.allclose(batched[:, -1], torch.stack(alone), atol=1e-5)
    assert [c.layers[0].offset for c in caches] == [len(tok.encode(p)) + 1 for p in PROMPTS]


def test_batched_sampling_is_seeded_per_sequence(engine):
    model, tok = engine
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(3)]
    a = batch_generate(model, tok, PROMPTS[:3], 8, params)
    b = [generate(model, tok, p, 8, sp).tokens for p, sp in zip(PROMPTS[:3], params, strict=True)]
    assert [r.tokens for r in a] == b


def test_batched_sliding_window_model(checkpoint):
    model, tok = load(checkpoint("mistral", sliding_window=8), "fp32")
    tok.eos_token_ids = set()
    alone = [generate(model, tok, p, 10).tokens for p in PROMPTS]
    assert [r.tokens for r in batch_generate(model, tok, PROMPTS, 10)] == alone

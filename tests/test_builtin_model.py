"""The shipped default model: loads offline, and its quality as measured by the engine matches its report."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

import edgellm
from edgellm.assets import default_model_path
from edgellm.kv.prompt_cache import PromptCache
from edgellm.runner import prefill_tokens
from edgellm.train.corpus import load_corpus


def test_builtin_model_perplexity_matches_its_training_report():
    model, tok = edgellm.load(dtype="fp32")
    report = json.loads((default_model_path() / "training.json").read_text())
    heldout = load_corpus().heldout
    ids: list[int] = []
    for text in load_corpus().read(heldout):
        ids += [*tok.encode(text), tok.backend.token_to_id("<|eos|>")]
        if len(ids) > 1025:
            break
    window = torch.tensor([ids[:1025]])
    with torch.no_grad():
        logits = model(window[:, :-1])
    ppl = math.exp(F.cross_entropy(logits[0], window[0, 1:]).item())
    assert ppl < model.args.vocab_size / 50  # far from uniform: the model really learned Python
    assert ppl < 1.5 * report["heldout_perplexity"]  # the recorded figure is not flattering


def test_builtin_model_cached_decode_matches_full_forward():
    model, tok = edgellm.load(dtype="fp32")
    ids = tok.encode("import os\n\ndef main():\n    path = os.path.join(")
    cache = PromptCache(model, 64)
    logits = prefill_tokens(model, ids, cache)
    seq = list(ids)
    for _ in range(8):
        seq.append(int(logits.argmax()))
        logits = model(torch.tensor([[seq[-1]]]), cache.layers, last_only=True)[0, -1]
    with torch.no_grad():
        full = model(torch.tensor([seq]))[0, -1]
    assert torch.allclose(full, logits, atol=1e-4)

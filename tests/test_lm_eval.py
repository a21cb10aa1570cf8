"""lm-evaluation-harness's `local-completions` model against the real server, offline, on the built-in model: the
tasks of `edgellm bench lmeval` (a multiple-choice task scored by loglikelihood and a generation task, built from
held-out stdlib lines and read by lm-eval from local JSON). Every loglikelihood lm-eval reports must equal the one
computed here from a plain forward pass over the same tokens, every generation the greedy answer of `generate`,
and the bench's own direct scoring must agree with both.

lm-eval is a test dependency only (it pulls datasets, pandas, scikit-learn, …): without it the test skips.
"""

from __future__ import annotations

import pytest
import torch

from edgellm.assets import default_model_path
from edgellm.bench.lmeval import GEN_TASK, MC_TASK, build_docs, run_lm_eval, running_server, score_directly, write_tasks
from edgellm.generate import generate
from edgellm.kv.prompt_cache import PromptCache
from edgellm.sampling import SamplingParams

LIMIT, MAX_GEN = 4, 12


def loglikelihood(model: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    """Sum of the continuation's logprobs from one forward pass over context + continuation."""
    tokens = context + continuation
    logits = model(torch.tensor([tokens]), PromptCache(model, capacity=len(tokens)).layers)[0].float()
    logprobs = logits[len(context) - 1:-1].log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


def test_bench_docs_are_fair_questions():
    mc, gen = build_docs(50, 12, seed=3)
    assert (mc, gen) == build_docs(50, 12, seed=3)  # seeded
    for doc in mc:
        line = doc["choices"][doc["answer"]]
        assert len(set(doc["choices"])) == 4 and line not in doc["context"].splitlines()
        indents = {c[:len(c) - len(c.lstrip())] for c in doc["choices"]}
        assert len(indents) == 1  # layout alone does not give the answer away
    for doc in gen:
        line = (doc["context"] + doc["target"]).splitlines()[-1].strip()
        assert doc["target"].strip() and "\n" not in doc["target"]
        assert doc["target"].startswith(" ") or " " not in line  # cut at a space where the line has one


@pytest.mark.slow
def test_lm_eval_local_completions_matches_the_python_api(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need it (its [api] extra)
    mc, gen = build_docs(LIMIT, 12, seed=0)
    write_tasks(tmp_path, mc, gen, MAX_GEN)
    model_dir = default_model_path()
    with running_server(str(model_dir), "fp32", tmp_path / "agents") as (url, app):
        model, tokenizer = app.state.engine.model, app.state.engine.tokenizer
        results = run_lm_eval(url, model.name, str(model_dir), tmp_path)
    scored = 0
    for sample in results["samples"][MC_TASK]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            # lm-eval moves the context's trailing whitespace into the continuation, then splits the whole's ids
            ids = tokenizer.encode(context.rstrip(), add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            with torch.no_grad():
                expected = loglikelihood(model, ids, whole[len(ids):])
            assert float(response[0][0]) == pytest.approx(expected, abs=1e-3), (context, continuation)
            scored += 1
    assert scored == 4 * LIMIT
    greedy = SamplingParams()
    for sample in results["samples"][GEN_TASK]:
        ids = tokenizer.encode(sample["arguments"][0][0], add_special_tokens=False)
        assert sample["resps"][0][0] == generate(model, tokenizer, ids, MAX_GEN, greedy, stop=["\n"]).text
    assert len(results["samples"][GEN_TASK]) == LIMIT
    direct = score_directly(results, model, tokenizer, MAX_GEN)
    assert direct["max_abs_loglikelihood_diff"] < 1e-3 and direct["gen_identical"] == LIMIT
    assert direct["mc_acc"] == results["results"][MC_TASK]["acc,none"]
    assert direct["mc_acc_norm"] == results["results"][MC_TASK]["acc_norm,none"]
    assert direct["gen_exact_match"] == results["results"][GEN_TASK]["exact_match,none"]

"""lm-evaluation-harness's `local-completions` model against the real server, offline: a multiple-choice
(loglikelihood) task and a generation task, both read from a local JSON file (lm-eval's `dataset_path: json`), on
the built-in model. Every loglikelihood lm-eval reports must equal the one computed here from a plain forward
pass over the same tokens, and every generation the greedy answer of `generate`.

lm-eval is a test dependency only (it pulls datasets, pandas, scikit-learn, …): without it the test skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgellm.generate import generate
from edgellm.kv.prompt_cache import PromptCache
from edgellm.sampling import SamplingParams
from tests.test_serve import Server

BUILTIN = Path(__file__).resolve().parents[1] / "edgellm" / "assets" / "default-model"
DOCS = [
    {"question": "import", "choices": ["os", "sys", "re", "json"], "answer": 0},
    {"question": "def __init__(self", "choices": ["):", ", name):", " = 1", "]]"], "answer": 0},
    {"question": "for i in", "choices": ["range(n):", "self", "None", "True"], "answer": 0},
    {"question": "if __name__ ==", "choices": ["'__main__':", "3", "None", "x"], "answer": 0},
    {"question": "raise", "choices": ["ValueError", "1", "self", "True"], "answer": 0},
    {"question": "with open(", "choices": ["path) as f:", "1)", "x", "self"], "answer": 0},
]
TASKS = {
    "edgellm_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "edgellm_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{choices[0]}}",
                    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
                    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
}


def write_tasks(root: Path) -> None:
    """The task files: YAML is a superset of JSON, so each config is written as JSON."""
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, config in TASKS.items():
        (root / f"{name}.yaml").write_text(json.dumps({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **config}))


def loglikelihood(model: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    """Sum of the continuation's logprobs from one forward pass over context + continuation."""
    tokens = context + continuation
    logits = model(torch.tensor([tokens]), PromptCache(model, capacity=len(tokens)).layers)[0].float()
    logprobs = logits[len(context) - 1:-1].log_softmax(-1)
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


@pytest.mark.slow
def test_lm_eval_local_completions_matches_the_python_api(tmp_path, monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # no hub: data is local
        monkeypatch.setenv(name, "1")
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need it (its [api] extra)
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    server = Server(BUILTIN, tmp_path / "agents")
    try:
        results = lm_eval.simple_evaluate(
            model="local-completions", tasks=list(TASKS), task_manager=TaskManager(include_path=str(tmp_path)),
            model_args={"model": server.model, "base_url": f"{server.url}/v1/completions", "tokenizer": str(BUILTIN),
                        "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1},
            log_samples=True)
    finally:
        server.stop()
    engine = server.app.state.engine
    model, tokenizer = engine.model, engine.tokenizer
    scored = 0
    for sample in results["samples"]["edgellm_mc"]:
        for args, response in zip(sample["arguments"], sample["resps"], strict=True):
            context, continuation = args
            ids = tokenizer.encode(context, add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            with torch.no_grad():
                expected = loglikelihood(model, ids, whole[len(ids):])
            assert float(response[0][0]) == pytest.approx(expected, abs=1e-3), (context, continuation)
            scored += 1
    assert scored == sum(len(d["choices"]) for d in DOCS)
    assert 0 <= results["results"]["edgellm_mc"]["acc,none"] <= 1
    greedy = SamplingParams()
    for sample in results["samples"]["edgellm_gen"]:
        context = sample["arguments"][0][0]
        ids = tokenizer.encode(context, add_special_tokens=False)
        expected = generate(model, tokenizer, ids, 12, greedy, stop=["\n"]).text
        assert sample["resps"][0][0] == expected, context
    assert len(results["samples"]["edgellm_gen"]) == len(DOCS)

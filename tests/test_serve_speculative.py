"""Speculative decoding in the server: per-request `"speculative"` and the server default, speculating and plain
sequences sharing the engine's steps with the output of plain greedy decoding."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edgellm import load, runner
from edgellm.runner import speculative_step
from edgellm.speculative import Speculation
from tests.conftest import build_checkpoint
from tests.test_serve import CONTEXT, Server

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("serve-spec"), "llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    draft, _ = load(model_dir, "fp32")
    srv = Server(model_dir, tmp_path_factory.mktemp("agents"), max_concurrency=8, prefill_chunk=64,
                 draft_model=draft, speculation=Speculation("ngram", 4, adaptive=False))
    yield srv
    srv.stop()


def complete(server: Server, prompt: str, **extra) -> httpx.Response:
    body = {"model": server.model, "prompt": prompt, "max_tokens": 24, "temperature": 0, **extra}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def test_speculating_and_plain_requests_share_the_engine_with_plain_output(server, monkeypatch):
    prompts = [PROMPT, PROMPT[20:], "import os\nimport sys\n" * 3]
    plain = [complete(server, p, speculative=False).json()["choices"][0]["text"] for p in prompts]
    drafted = []

    def counted(model, seq):
        before = seq.drafted
        outputs = speculative_step(model, seq)
        drafted.append(seq.drafted - before)
        return outputs

    monkeypatch.setattr(runner, "speculative_step", counted)
    kinds = [{}, {"speculative": {"mode": "draft", "k": 3}}, {"speculative": {"mode": "ngram", "adaptive": False}},
             {"speculative": {"mode": "draft", "k": 4, "p_min": 0.004}}, {"speculative": False}]
    jobs = [(i, kind) for i in range(len(prompts)) for kind in kinds]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: complete(server, prompts[job[0]], **job[1]), jobs))
    for (i, _), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == plain[i]
    assert sum(drafted) > 0


@pytest.mark.parametrize("value", [{"mode": "kvpred"}, {"mode": "tree"}, {"k": 0}, {"k": 65}, {"p_min": 1.0}, True])
def test_bad_speculative_field_is_a_400_naming_it(server, value):
    answer = complete(server, "hello", speculative=value)
    assert answer.status_code == 400 and "speculative" in answer.json()["error"]["message"]

"""Fuzzing every endpoint's input against a real server: whatever arrives, the answer is a success or an OpenAI-format
4xx, never a 500, and the server keeps answering others while it refuses the largest requests."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import build_checkpoint
from tests.test_serve import Server

CONTEXT = 32  # a short context bounds every generation, whatever max_tokens the fuzzer picks
FUZZ = settings(max_examples=220, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

def texts(size: int) -> st.SearchStrategy:
    """Text, often with a lone surrogate inside: JSON can carry one, UTF-8 cannot."""
    surrogate = st.sampled_from(["\ud800", "\udbff", "\udfff"])
    return st.text(max_size=size) | st.builds("{}{}{}".format, st.text(max_size=size), surrogate, st.text(max_size=4))


scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["\ud800", "a\udfffb", "\x00", "../etc", "alice\n", "", "5", "true"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3), max_leaves=8)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly what a client means to send, sometimes any JSON value."""
    return st.one_of(valid, valid, values)


def sampling(model: str) -> dict[str, st.SearchStrategy]:
    return {
        "max_tokens": field(st.integers(1, 3)), "temperature": field(st.floats(0, 2)),
        "top_p": field(st.floats(0, 1)), "top_k": field(st.integers(0, 500)), "min_p": field(st.floats(0, 1)),
        "repetition_penalty": field(st.floats(0, 3)), "presence_penalty": field(st.floats(-2, 2)),
        "frequency_penalty": field(st.floats(-2, 2)),
        "seed": field(st.integers(-2**64, 2**64) | st.sampled_from([2**63, -2**63 - 1, 1180591620717411303424])),
        "stop": field(texts(3) | st.lists(texts(3), max_size=5)), "n": field(st.just(1)),
        "stream": field(st.booleans()),
        "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "user": field(texts(20)), "kv_prediction": field(st.booleans()), "model": field(st.just(model)),
    }


def bodies(model: str, required: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    optional = {k: v for k, v in sampling(model).items() if k != "model"}
    return st.fixed_dictionaries({"model": sampling(model)["model"], **required}, optional=optional) | values


def check(response: httpx.Response, lines: list[str] | None = None, completion: bool = True) -> None:
    """Never a 500; a 4xx in OpenAI's error shape; a stream that ends with [DONE], a completion with a choice."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = json.loads(lines[0] if lines else response.content)["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    elif lines is not None:  # an error event in a 200 stream would be an engine fault
        assert lines[-1] == "data: [DONE]" and not any(x.startswith('data: {"error"') for x in lines), lines
    elif completion:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def post(http: httpx.Client, path: str, body: object, agent: str | None = None) -> None:
    headers = {"content-type": "application/json", **({"X-Agent-Id": agent} if agent else {})}
    content = json.dumps(body).encode()  # ASCII: lone surrogates travel as \ud800 escapes, NaN as NaN
    if isinstance(body, dict) and body.get("stream") is True:
        with http.stream("POST", path, content=content, headers=headers) as r:
            check(r, [line for line in r.iter_lines() if line])
    else:
        check(http.post(path, content=content, headers=headers))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_checkpoint(tmp_path_factory.mktemp("fuzz-llama"), "llama", max_position_embeddings=CONTEXT)
    srv = Server(Path(model), tmp_path_factory.mktemp("fuzz-agents"), max_concurrency=4, max_queue=16)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:  # keep-alive: the fuzzing is in the bodies
        yield client


def test_fuzz_completions(server, http):
    prompt = field(texts(40) | st.lists(st.integers(-5, 400), max_size=8) | st.lists(texts(8), max_size=2)
                   | st.lists(st.lists(st.integers(0, 400), max_size=4), max_size=2))

    @FUZZ
    @given(bodies(server.model, {"prompt": prompt}))
    def run(body: object) -> None:
        post(http, "/v1/completions", body)

    run()


def test_fuzz_chat_completions(server, http):
    part = st.fixed_dictionaries({"type": field(st.just("text")), "text": field(texts(10))})
    message = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "tool"]))},
                                    optional={"content": field(texts(30) | st.lists(part, max_size=2)),
                                              "name": values})
    agent = st.none() | st.from_regex(r"[a-zA-Z0-9_./-]([a-zA-Z0-9_./ -]{0,10}[a-zA-Z0-9_./-])?", fullmatch=True)

    @FUZZ
    @given(bodies(server.model, {"messages": field(st.lists(message, max_size=3)),
                                 "max_completion_tokens": field(st.integers(1, 3))}), agent)
    def run(body: object, agent: str | None) -> None:
        post(http, "/v1/chat/completions", body, agent)

    run()


def test_fuzz_agent_endpoints(http):
    @settings(FUZZ, max_examples=100)
    @given(st.text(min_size=1, max_size=20), st.sampled_from(["GET", "DELETE"]))
    def run(name: str, method: str) -> None:
        check(http.request(method, f"/v1/agents/{quote(name, safe='')}"), completion=False)

    run()


def test_answers_others_while_refusing_the_largest_requests(server):
    limit, chars = server.app.state.max_body_bytes, server.app.state.max_prompt_chars
    at_limit = json.dumps({"model": server.model, "prompt": "x" * chars}).encode()  # tokenized, then refused
    filler = json.dumps({"model": server.model, "prompt": ""}).encode()
    largest = filler[:-2] + b"x" * (limit - len(filler)) + filler[-2:]  # exactly the limit: refused by its length
    huge = json.dumps({"model": server.model, "prompt": "import os\n" * 2_000_000}).encode()  # 20 MB: 413
    assert len(largest) == limit
    statuses: list[int] = []

    def send_all() -> None:
        for body in (largest, at_limit, huge, largest, at_limit):
            statuses.append(httpx.post(f"{server.url}/v1/completions", content=body, timeout=60).status_code)

    sender = threading.Thread(target=send_all)
    sender.start()
    while sender.is_alive():
        start = time.perf_counter()
        assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200
        assert time.perf_counter() - start < 1.0
    sender.join()
    assert statuses == [400, 400, 413, 400, 400]

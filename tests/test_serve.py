"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from edgellm import SamplingParams, load
from edgellm.agents import AgentStore
from edgellm.serve import create_app, is_loopback, parse_bytes
from edgellm.serve.metrics import ServerMetrics
from edgellm.serve.scheduler import Engine, GenerationRequest
from tests.conftest import build_checkpoint

CONTEXT = 512


class Server:
    """A real uvicorn server in a background thread, on a free loopback port."""

    def __init__(self, model_dir: Path, store_dir: Path, budget: int | None = None, **options) -> None:
        model, tokenizer = load(model_dir, "fp32")
        tokenizer.eos_token_ids = set()  # a random model may say EOS at any step; tests want fixed lengths
        store = AgentStore(store_dir, model, tokenizer, "fp16", budget)
        self.app = create_app(model, tokenizer, store, **options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model.name

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("serve-llama"), "llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("agents"), max_concurrency=8, max_queue=64, prefill_chunk=32)
    yield srv
    srv.stop()


def chat(client: openai.OpenAI, model: str, messages: list[dict], agent: str | None = None, **kw):
    headers = {"X-Agent-Id": agent} if agent else None
    return client.chat.completions.create(model=model, messages=messages, temperature=0, extra_headers=headers,
                                          **{"max_tokens": 8, **kw})


def test_models_and_health(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [server.model]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["context"] == CONTEXT


def test_chat_streaming_equals_non_streaming(server):
    client, messages = server.client(), [{"role": "user", "content": "def fibonacci(n):"}]
    full = chat(client, server.model, messages, max_tokens=10)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + 10
    stream = chat(client, server.model, messages, max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_streaming_and_not(server):
    client = server.client()
    full = client.completions.create(model=server.model, prompt="import os\n", max_tokens=12, temperature=0)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    pieces = client.completions.create(model=server.model, prompt="import os\n", max_tokens=12, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == full.choices[0].text


def test_raw_sse_ends_with_done(server):
    body = {"model": server.model, "prompt": "hello", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings(server):
    client = server.client()
    text = client.completions.create(model=server.model, prompt="The quick", max_tokens=24,
                                     temperature=0).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.completions.create(model=server.model, prompt="The quick", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    streamed = client.completions.create(model=server.model, prompt="The quick", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_seed_determinism(server):
    client = server.client()
    kw = dict(model=server.model, prompt="import sys", max_tokens=16, temperature=1.0)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b
    assert c != a
    penalised = client.completions.create(seed=7, frequency_penalty=1.5, presence_penalty=0.5, **kw)
    assert penalised.usage.completion_tokens == 16
    one = client.completions.create(**{**kw, "max_tokens": 1})
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_agent_reuses_memory_and_agents_never_mix(server):
    client = server.client()
    talks = {"alice": "def fibonacci(n):", "bob": "The quick brown fox jumps"}
    history = {name: [{"role": "user", "content": text}] for name, text in talks.items()}
    for name in talks:
        reply = chat(client, server.model, history[name], agent=name)
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
        history[name] += [{"role": "assistant", "content": reply.choices[0].message.content},
                          {"role": "user", "content": "and then?"}]
    for name in talks:
        # the `user` field names the agent too
        second = client.chat.completions.create(model=server.model, messages=history[name], temperature=0,
                                                max_tokens=8, user=name)
        assert second.usage.prompt_tokens_details.cached_tokens > 0
        fresh = chat(client, server.model, history[name])  # no agent: nothing of anyone's memory
        assert second.choices[0].message.content == fresh.choices[0].message.content
    agents = {a["id"]: a for a in httpx.get(f"{server.url}/v1/agents").json()["data"]}
    assert {"alice", "bob"} <= set(agents)
    assert agents["alice"]["tokens"] > 0
    assert httpx.get(f"{server.url}/v1/agents/alice").json()["messages"] == 4
    assert httpx.delete(f"{server.url}/v1/agents/bob").json()["deleted"] is True
    assert httpx.get(f"{server.url}/v1/agents/bob").status_code == 404


def test_agent_memory_survives_restart(model_dir, tmp_path):
    store = tmp_path / "agents"
    first = Server(model_dir, store)
    client = first.client()
    history = {a: [{"role": "user", "content": "import os\nimport sys"}] for a in ("restarted", "reference")}
    for turn in range(2):
        for name in history:
            reply = chat(client, first.model, history[name], agent=name)
            history[name] += [{"role": "assistant", "content": reply.choices[0].message.content},
                              {"role": "user", "content": f"turn {turn}"}]
    assert history["restarted"] == history["reference"]
    expected = chat(client, first.model, history["reference"], agent="reference")
    first.stop()
    assert (store / "restarted.safetensors").exists()
    second = Server(model_dir, store)
    try:
        reply = chat(second.client(), second.model, history["restarted"], agent="restarted")
        metrics = httpx.get(f"{second.url}/metrics").text
    finally:
        second.stop()
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.usage.prompt_tokens_details.cached_tokens == expected.usage.prompt_tokens_details.cached_tokens > 0
    assert "edgellm_restored_tokens_total" in metrics and "edgellm_restored_tokens_total 0.0" not in metrics


def test_concurrent_streams_equal_one_at_a_time(server):
    client = server.client()
    prompts = [f"line {i}: " + "import os\n" * (i % 4) + "x" * (i % 5) for i in range(24)]
    alone = [client.completions.create(model=server.model, prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in prompts]

    def run(prompt: str) -> str:
        c = server.client()
        chunks = c.completions.create(model=server.model, prompt=prompt, max_tokens=10, temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in chunks if ch.choices)

    def batched_steps() -> float:
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        ones = next(x for x in lines if x.startswith('edgellm_decode_batch_size_bucket{le="1.0"}'))
        total = next(x for x in lines if x.startswith("edgellm_decode_batch_size_count"))
        return float(total.split()[-1]) - float(ones.split()[-1])

    before = batched_steps()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone
    assert batched_steps() > before  # some decode steps really ran several sequences at once
    assert httpx.get(f"{server.url}/health").json()["active"] == 0


def test_agents_stay_within_memory_budget(model_dir, tmp_path):
    budget = 150_000  # about two agents' KV memory
    srv = Server(model_dir, tmp_path, budget=budget)
    try:
        client = srv.client()
        history = {f"agent{i}": [{"role": "user", "content": f"import os {i}"}] for i in range(5)}
        for name, messages in history.items():
            reply = chat(client, srv.model, messages, agent=name)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": "more"}]
        stats = httpx.get(f"{srv.url}/health").json()["agents"]
        assert stats["live_bytes"] <= budget and stats["evictions"] > 0
        again = chat(client, srv.model, history["agent0"], agent="agent0")  # evicted, restored from disk
        assert again.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        srv.stop()


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_inputs_get_openai_errors(server):
    url, model = server.url, server.model
    good = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "temperature": -1}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "n": 2}, 400, "n"),
        ({**good, "messages": []}, 400, "messages"),
        ({**good, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({**good, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
        ({k: v for k, v in good.items() if k != "messages"}, 400, "messages"),
        ({**good, "model": "gpt-4"}, 404, "model"),
        ({**good, "messages": [{"role": "user", "content": "import os\n" * CONTEXT}]}, 400, "messages"),
    ]
    for body, status, param in cases:
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == status, (body, r.text)
        err = _error(r)
        assert err["param"] == param, (body, err)
    r = httpx.post(f"{url}/v1/chat/completions", json=good, headers={"X-Agent-Id": "../etc/passwd"})
    assert r.status_code == 400 and "invalid agent name" in _error(r)["message"]
    # OpenAI's `user` is free-form (often an e-mail): a value that is no valid agent name is hashed, not refused
    r = httpx.post(f"{url}/v1/chat/completions", json={**good, "user": "../etc/passwd"})
    assert r.status_code == 200
    names = [a["id"] for a in httpx.get(f"{url}/v1/agents").json()["data"]]
    assert not any("/" in n or ".." in n for n in names) and any(n.startswith("u-") for n in names)
    too_long = httpx.post(f"{url}/v1/chat/completions",
                          json={**good, "messages": [{"role": "user", "content": "import os\n" * CONTEXT}]})
    assert str(CONTEXT) in _error(too_long)["message"]
    assert _error(too_long)["code"] == "context_length_exceeded"
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in _error(r)["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": [999999]})
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": ""})
    assert r.status_code == 400
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    assert httpx.get(f"{url}/v1/agents/nobody").status_code == 404
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=model, prompt="x", temperature=5)


def test_api_key_required(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        r = httpx.get(f"{srv.url}/v1/models")
        assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
        assert srv.client("sekret").models.list().data[0].id == srv.model
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()


def test_full_queue_answers_429_and_disconnect_frees_slot(tmp_path):
    # a long context so the first stream is still running (for minutes) when the others arrive
    long_dir = build_checkpoint(tmp_path / "long", "llama", max_position_embeddings=1 << 16)
    srv = Server(long_dir, tmp_path / "agents", max_concurrency=1, max_queue=1)
    body = {"model": srv.model, "prompt": "import os", "max_tokens": 60000, "stream": True, "temperature": 0}
    try:
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{srv.url}/v1/completions", json=body) as first:
            lines = first.iter_lines()  # kept referenced: dropping the iterator closes the response
            next(lines)  # running: it holds the only slot
            with http.stream("POST", f"{srv.url}/v1/completions", json=body) as second:
                assert second.status_code == 200  # queued behind the first
                third = httpx.post(f"{srv.url}/v1/completions", json=body)
                assert third.status_code == 429 and third.headers["retry-after"]
                assert _error(third)["type"] == "rate_limit_error"
        # both clients hung up mid-stream: their sequences are cancelled and the slot is free again
        deadline = time.time() + 10
        while (health := httpx.get(f"{srv.url}/health").json())["active"] or health["queued"]:
            assert time.time() < deadline, health
            time.sleep(0.05)
        metrics = httpx.get(f"{srv.url}/metrics").text
        cancelled = next(line for line in metrics.splitlines() if line.startswith("edgellm_cancelled_total"))
        assert float(cancelled.split()[-1]) >= 1
        reply = srv.client().completions.create(model=srv.model, prompt="x", max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens == 2
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is cancelled too
            httpx.post(f"{srv.url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
        deadline = time.time() + 10
        while httpx.get(f"{srv.url}/health").json()["active"]:
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        srv.stop()


def test_metrics_report_requests_and_latency(server):
    server.client().completions.create(model=server.model, prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("edgellm_requests_total", "edgellm_time_to_first_token_seconds_bucket",
                 "edgellm_inter_token_latency_seconds_bucket", "edgellm_cached_tokens_total", "edgellm_kv_bytes",
                 "edgellm_queue_depth"):
        assert name in text
    assert 'edgellm_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_helpers():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 10**6
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_cli_refuses_public_host_without_key(capsys):
    from edgellm.cli import main
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "api-key" in capsys.readouterr().err


def test_engine_chunks_long_prefill_between_decode_steps_and_serialises_an_agent(model_dir, tmp_path):
    model, tokenizer = load(model_dir, "fp32")
    tokenizer.eos_token_ids = set()
    engine = Engine(model, tokenizer, AgentStore(tmp_path, model, tokenizer), ServerMetrics(), max_concurrency=4,
                    prefill_chunk=16)
    loop = asyncio.new_event_loop()

    def request(text: str, max_tokens: int, agent: str | None = None) -> GenerationRequest:
        return GenerationRequest(tokenizer.encode(text), max_tokens, SamplingParams(), loop, agent=agent)

    def seq(req: GenerationRequest):
        return next(s.seq for s in engine.running if s.request is req)

    try:
        short = request("x", 100)
        engine.submit(short)
        engine.step()  # prefill, first token, and already one decode step
        assert len(seq(short).generated) == 2
        long = request("import os\n" * 30, 4)
        engine.submit(long)
        chunks = 0
        while chunks == 0 or seq(long).pending:
            engine.step()
            chunks += 1
            assert len(seq(short).generated) == chunks + 2  # the running stream got a token every step
        assert chunks == -(-len(long.ids) // 16) > 1
        first, second = request("a", 3, agent="ann"), request("b", 3, agent="ann")
        engine.submit(first)
        engine.submit(second)
        engine.step()
        assert any(s.request is first for s in engine.running)
        assert not any(s.request is second for s in engine.running) and list(engine.waiting) == [second]
        while any(s.request is first for s in engine.running):
            engine.step()
        engine.step()
        assert any(s.request is second for s in engine.running)
    finally:
        loop.close()


def test_bench_serve_sweep_and_agent_turns(server, tmp_path, capsys):
    from edgellm.cli import main
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--url", server.url, "--concurrency", "1,4", "--requests", "4", "--prompt-len",
                 "16", "--max-tokens", "4", "--agents", "2", "--turns", "2", "--context-len", "16",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        generated = lv["tokens_per_s"] * lv["wall_s"]  # a token count, not a speed: every request produced text
        assert lv["success_rate"] == 1.0 and round(generated) >= lv["requests"]
    cold, warm = report["agent_turns"]
    assert cold["kind"] == "cold" and cold["cached_tokens_mean"] == 0
    assert warm["cached_tokens_mean"] > 0
    assert "saturation" in capsys.readouterr().out


def test_engine_stop_fails_in_flight_requests_and_flushes_agent_memory(model_dir, tmp_path):
    model, tokenizer = load(model_dir, "fp32")
    tokenizer.eos_token_ids = set()
    store = AgentStore(tmp_path, model, tokenizer)
    engine = Engine(model, tokenizer, store, ServerMetrics())
    loop = asyncio.new_event_loop()
    try:
        req = GenerationRequest(tokenizer.encode("import os"), CONTEXT, SamplingParams(), loop, agent="keeper")
        engine.start()
        engine.submit(req)
        deadline = time.time() + 10
        while "keeper" not in store.live or len(store.live["keeper"].cache.tokens) < 8:
            assert time.time() < deadline
            time.sleep(0.01)
        engine.stop()
        loop.run_until_complete(asyncio.sleep(0))  # deliver what the engine thread scheduled
        events = [req.events.get_nowait() for _ in range(req.events.qsize())]
        assert events[-1].error is not None and events[-1].error.status == 503
        assert {a.name: a.tokens for a in store.list()}["keeper"] >= 8
    finally:
        loop.close()

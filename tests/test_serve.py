"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
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
from edgellm.models.lora import load_adapter
from edgellm.serve import ShutdownNotifyingServer, create_app, is_loopback, parse_bytes
from edgellm.serve.metrics import ServerMetrics
from edgellm.serve.scheduler import Engine, GenerationRequest
from tests.conftest import build_checkpoint

CONTEXT = 512


class Server:
    """A real uvicorn server in a background thread, on a free loopback port."""

    def __init__(self, model_dir: Path, store_dir: Path, budget: int | None = None, kv_format: str = "fp16",
                 store_options: dict | None = None, adapters: dict[str, Path] | None = None, **options) -> None:
        model, tokenizer = load(model_dir, "fp32")
        for name, path in (adapters or {}).items():
            load_adapter(model, path, name)
        tokenizer.eos_token_ids = set()  # a random model may say EOS at any step; tests want fixed lengths
        store = AgentStore(store_dir, model, tokenizer, kv_format, budget, **(store_options or {}))
        self.store = store
        self.store_dir = Path(store_dir)
        self.app = create_app(model, tokenizer, store, **options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = ShutdownNotifyingServer(config, self.app.state.begin_shutdown)
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


def batched_steps(url: str) -> float:
    """Decode steps so far that ran more than one sequence, from the server's own metrics."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    ones = next(x for x in lines if x.startswith('edgellm_decode_batch_size_bucket{le="1.0"}'))
    total = next(x for x in lines if x.startswith("edgellm_decode_batch_size_count"))
    return float(total.split()[-1]) - float(ones.split()[-1])


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

    before = batched_steps(server.url)
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone
    assert batched_steps(server.url) > before  # some decode steps really ran several sequences at once
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


def _post_raw(server: Server, path: str, body: str) -> httpx.Response:
    """POST a JSON text as is: json.dumps would not write Infinity the way a client bug might, nor keep escapes."""
    return httpx.post(f"{server.url}{path}", content=body.encode(), headers={"content-type": "application/json"})


def test_out_of_range_seed_is_400_and_keeps_the_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for seed in ("1180591620717411303424", str(-2**63 - 1), str(2**63)):
            conn.request("POST", "/v1/completions", f'{{"model": "{server.model}", "prompt": "x", "seed": {seed}}}',
                         {"content-type": "application/json"})
            sock = conn.sock
            response = conn.getresponse()
            body = json.loads(response.read())
            assert response.status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["param"] == "seed"
            conn.request("GET", "/v1/models")  # on the same keep-alive connection: it was not dropped
            assert conn.getresponse().read() and conn.sock is sock is not None
    finally:
        conn.close()
    for seed in (2**63 - 1, -2**63):  # the int64 range OpenAI documents is accepted
        r = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": "x", "max_tokens": 1,
                                                              "seed": seed, "temperature": 1})
        assert r.status_code == 200, r.text


def test_lone_surrogates_are_400(server):
    model, chat_ = server.model, "/v1/chat/completions"
    message = '[{"role": "user", "content": "hi"}]'
    cases = [
        ("/v1/completions", f'{{"model": "{model}", "prompt": "a\\ud800b"}}', "prompt"),
        ("/v1/completions", f'{{"model": "{model}", "prompt": ["\\udfff"]}}', "prompt.0"),
        ("/v1/completions", f'{{"model": "{model}", "prompt": "\\ud800", "stream": true}}', "prompt"),
        ("/v1/completions", f'{{"model": "{model}", "prompt": "x", "stop": ["\\ud800"]}}', "stop.0"),
        (chat_, f'{{"model": "{model}", "messages": [{{"role": "user", "content": "\\ud800"}}]}}',
         "messages.0.content"),
        (chat_, f'{{"model": "{model}", "messages": [{{"role": "user", "content": "\\ud800"}}], "stream": true}}',
         "messages.0.content"),
        (chat_, f'{{"model": "{model}", "messages": [{{"role": "user", "content": [{{"type": "text", '
                f'"text": "\\ud800"}}]}}]}}', "messages.0.content.0.text"),
        (chat_, f'{{"model": "{model}", "messages": {message}, "user": "\\ud800"}}', "user"),
    ]
    for path, body, param in cases:
        r = _post_raw(server, path, body)
        assert r.status_code == 400, (body, r.text)
        err = _error(r)
        assert err["param"] == param and "surrogate" in err["message"], (body, err)


def test_types_are_strict_and_numbers_finite(server):
    model = server.model
    base = f'"model": "{model}", "prompt": "x"'
    refused = [('"max_tokens": "5"', "max_tokens"), ('"max_tokens": true', "max_tokens"),
               ('"max_tokens": 2.0', "max_tokens"), ('"stream": "yes"', "stream"), ('"stream": 1', "stream"),
               ('"n": true', "n"), ('"temperature": true', "temperature"), ('"temperature": "1"', "temperature"),
               ('"repetition_penalty": Infinity', "repetition_penalty"), ('"top_p": NaN', "top_p"),
               ('"temperature": 1e999', "temperature"), ('"seed": "7"', "seed"), ('"top_k": 1.5', "top_k"),
               ('"stream_options": {"include_usage": "true"}', "stream_options.include_usage"),
               ('"stop": ["a", "b", "c", "d", "e"]', "stop")]
    for fields, param in refused:
        r = _post_raw(server, "/v1/completions", f"{{{base}, {fields}}}")
        assert r.status_code == 400, (fields, r.text)
        assert _error(r)["param"] == param, (fields, r.text)
    r = _post_raw(server, "/v1/completions", f'{{"model": "{model}", "prompt": [true]}}')
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    r = _post_raw(server, "/v1/completions", f'{{"model": "{model}", "prompt": [[1, 2], [3]]}}')
    assert r.status_code == 400 and "one prompt" in _error(r)["message"]
    accepted = ['"temperature": 1', '"top_p": 1', '"presence_penalty": 0', '"max_tokens": 2, "seed": 3',
                '"temperature": 1e-300', '"top_p": 1e-300, "temperature": 1']
    for fields in accepted:  # OpenAI takes an int where a number is due; tiny values must not break sampling
        r = _post_raw(server, "/v1/completions", f'{{{base}, "max_tokens": 2, {fields}}}')
        assert r.status_code == 200, (fields, r.text)
    for prompt in ("import os", ["import os"], [5, 6, 7], [[5, 6, 7]]):  # OpenAI's four prompt forms
        r = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, (prompt, r.text)


def test_body_limit_and_early_length_check(server):
    limit, chars = server.app.state.max_body_bytes, server.app.state.max_prompt_chars
    assert httpx.get(f"{server.url}/health").json()["max_body_bytes"] == limit
    big = json.dumps({"model": server.model, "prompt": "import os\n" * (2 * limit // 10)}).encode()
    r = httpx.post(f"{server.url}/v1/completions", content=big)
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    r = httpx.post(f"{server.url}/v1/completions", content=iter([big[:limit], big[limit:]]))  # chunked: no length
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    for path, key, param in (("/v1/completions", "prompt", "prompt"), ("/v1/chat/completions", "messages", "messages")):
        text = "x" * (chars + 1)
        value = text if key == "prompt" else [{"role": "user", "content": text}]
        r = httpx.post(f"{server.url}{path}", json={"model": server.model, key: value})
        err = _error(r)
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == param
        assert f"{chars + 1} characters" in err["message"]  # refused before tokenizing, by its length in characters
    r = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": "x" * chars})
    assert r.status_code == 400 and "tokens" in _error(r)["message"]  # within the bound: tokenized, then refused


def test_agent_names_with_a_newline_never_reach_the_store(server):
    good = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**good, "user": "alice\n"})
    assert r.status_code == 200
    hashed = "u-" + hashlib.sha256(b"alice\n").hexdigest()[:16]
    assert httpx.get(f"{server.url}/v1/agents/{hashed}").status_code == 200
    deadline = time.time() + 10
    while not (server.store_dir / f"{hashed}.safetensors").exists():  # saved just after the reply
        assert time.time() < deadline
        time.sleep(0.05)
    assert not any("\n" in p.name for p in server.store_dir.iterdir())
    assert all("\n" not in a["id"] for a in httpx.get(f"{server.url}/v1/agents").json()["data"])

    async def with_header() -> httpx.Response:
        # no HTTP/1.1 client or server lets a raw newline into a header value; over ASGI (a proxy, HTTP/2) it can
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", json=good, headers={"X-Agent-Id": "a\n"})

    r = asyncio.run(with_header())
    assert r.status_code == 400 and "invalid agent name" in _error(r)["message"]
    assert not (server.store_dir / "a\n.safetensors").exists()


def test_health_details_need_the_api_key(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path, api_key="sekret")
    try:
        assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{srv.url}/health", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ok"}
        full = httpx.get(f"{srv.url}/health", headers={"Authorization": "Bearer sekret"}).json()
        assert full["status"] == "ok" and "agents" in full and full["context"] == CONTEXT
    finally:
        srv.stop()


def test_sigterm_ends_a_running_stream_with_an_error_event(tmp_path):
    model = build_checkpoint(tmp_path / "model", "llama", max_position_embeddings=4096)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["eos_token"]  # a random model may say EOS at any step: the stream must still run at SIGTERM
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "generation_config.json").unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgellm", "serve", "--model", str(model), "--port", str(port),
                             "--store", str(tmp_path / "agents"), "--dtype", "fp32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "server did not start"
                time.sleep(0.2)
        body = {"model": name, "prompt": "import os", "max_tokens": 4000, "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():  # a cut-off chunked body would raise RemoteProtocolError here
                lines.append(line)
                if len(lines) == 6:
                    proc.send_signal(signal.SIGTERM)
        events = [line.removeprefix("data: ") for line in lines if line]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        assert "shutting down" in error["message"]
        # ended at SIGTERM, not after the 4000 tokens (a tiny model streams ~100 more while the signal is handled)
        assert len(events) < 1000
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert b"graceful shutdown exceeded" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

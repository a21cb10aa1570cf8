"""The server's KV memory as one block pool: prefix sharing between agents, eviction by block, clear refusals."""

from __future__ import annotations

import httpx
import pytest

from edgellm.kv import BlockPool, KVFormat
from tests.test_serve import Server

BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("pool-llama"), "llama", max_position_embeddings=512)


def pool_bytes(srv_or_model, fmt: str, blocks: int) -> int:
    probe = BlockPool(srv_or_model.args, KVFormat.parse(fmt), 1 << 20, BLOCK)
    return blocks * probe.block_bytes


def complete(srv: Server, prompt: str, agent: str | None = None, max_tokens: int = 6):
    headers = {"X-Agent-Id": agent} if agent else None
    return srv.client().completions.create(model=srv.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           extra_headers=headers)


def stats(srv: Server) -> dict:
    return httpx.get(f"{srv.url}/health").json()["agents"]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("plain"), kv_format="q8")
    yield srv
    srv.stop()


def test_agents_with_one_system_prompt_store_it_once(model_dir, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_FUSED_STEP", "0")  # contiguous and paged caches both op at a time
    from edgellm import load

    model, _ = load(model_dir, "fp32")
    srv = Server(model_dir, tmp_path, kv_format="q8",
                 store_options={"pool_bytes": pool_bytes(model, "q8", 400), "block_tokens": BLOCK})
    try:
        system = "You are a careful assistant. " + "Rules: be brief, be exact, cite the file. " * 12
        questions = [f"Question {i}: what does module {i} do?" for i in range(4)]
        physical = []
        for i, q in enumerate(questions):
            got = complete(srv, system + q, agent=f"agent{i}")
            want = complete(reference, system + q, agent=f"agent{i}")
            assert got.choices[0].text == want.choices[0].text
            cached = got.usage.prompt_tokens_details.cached_tokens
            assert cached == 0 if i == 0 else cached >= got.usage.prompt_tokens - 2 * BLOCK
            physical.append(stats(srv))
        one, four = physical[0], physical[-1]
        assert four["shared_blocks"] > 0 and four["logical_bytes"] > 3 * one["live_bytes"]
        assert four["live_bytes"] <= 1.6 * one["live_bytes"]
        agents = {a["id"]: a for a in httpx.get(f"{srv.url}/v1/agents").json()["data"]}
        assert all(agents[f"agent{i}"]["private_bytes"] < agents[f"agent{i}"]["live_bytes"] for i in range(4))
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert "edgellm_kv_logical_bytes" in metrics
    finally:
        srv.stop()


def test_a_full_pool_writes_idle_agents_back_and_restores_them(model_dir, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_FUSED_STEP", "0")
    from edgellm import load

    model, _ = load(model_dir, "fp32")
    layers = model.args.num_hidden_layers
    budget = pool_bytes(model, "q8", 3 * 5 * layers)  # about three agents of ~70 tokens
    srv = Server(model_dir, tmp_path, kv_format="q8", store_options={"pool_bytes": budget, "block_tokens": BLOCK})
    try:
        prompts = {f"solo{i}": f"Agent {i} notes: " + f"item {i} " * 20 for i in range(6)}
        for turn in range(2):
            for name, prompt in prompts.items():
                got = complete(srv, prompt, agent=name)
                want = complete(reference, prompt, agent=name)
                assert got.choices[0].text == want.choices[0].text
                if turn:  # evicted or not, the agent's memory serves its earlier turns
                    cached = got.usage.prompt_tokens_details.cached_tokens
                    assert cached == want.usage.prompt_tokens_details.cached_tokens > 0
                prompts[name] = prompt + got.choices[0].text + " next"
                s = stats(srv)
                assert s["live_bytes"] <= s["pool_bytes"] <= budget
        assert stats(srv)["evictions"] > 0
    finally:
        srv.stop()


def test_a_prompt_larger_than_the_pool_is_refused_in_one_line(model_dir, tmp_path):
    from edgellm import load

    model, _ = load(model_dir, "fp32")
    srv = Server(model_dir, tmp_path, kv_format="q8",
                 store_options={"pool_bytes": pool_bytes(model, "q8", 2 * model.args.num_hidden_layers),
                                "block_tokens": BLOCK})
    try:
        free = stats(srv)["free_blocks"]
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": srv.model, "prompt": "word " * 100,
                                                          "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_too_large_for_memory"
        assert "--memory-budget" in r.json()["error"]["message"]
        assert stats(srv)["free_blocks"] == free  # nothing of the refused request is held
        assert complete(srv, "short", max_tokens=2).usage.completion_tokens == 2  # the server still answers
    finally:
        srv.stop()

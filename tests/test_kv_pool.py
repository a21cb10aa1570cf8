"""Block pool and paged caches: same tokens and same saved tensors as contiguous caches, COW forks, budgets."""

from __future__ import annotations

import pytest
import torch

from edgellm import load
from edgellm.agents import AgentStore
from edgellm.errors import InvalidRequestError
from edgellm.generate import generate
from edgellm.kv import BlockPool, KVFormat, PagedKVCache, PoolExhausted
from edgellm.kv.persist import RestoreError, restore_memory, save_memory
from edgellm.kv.prompt_cache import PromptCache

BLOCK = 16
FORMATS = ["fp32", "fp16", "q8", "q4", "q4-h"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tests.conftest import build_checkpoint

    model, tok = load(build_checkpoint(tmp_path_factory.mktemp("llama"), max_position_embeddings=1024), "fp32")
    tok.eos_token_ids = set()
    return model, tok


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 384, (n,), generator=g).tolist()


def pool_for(model, fmt: str, blocks: int = 64) -> BlockPool:
    fmt = KVFormat.parse(fmt)
    probe = BlockPool(model.args, fmt, 1 << 20, BLOCK)
    return BlockPool(model.args, fmt, blocks * probe.block_bytes, BLOCK)


def assert_same_states(a: PromptCache, b: PromptCache, exact_layers: int | None = None) -> None:
    """Same tensor names, dtypes and shapes everywhere; bit-identical values in the first `exact_layers` layers."""
    for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        sa, sb = la.state(), lb.state()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
            if exact_layers is None or i < exact_layers:
                assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", FORMATS)
def test_paged_generation_matches_contiguous_across_blocks_and_turns(engine, fmt, monkeypatch):
    # op at a time in both: a contiguous dense cache would decode through the fused native step, whose fp32 dot
    # products sum in another order than F.linear (test_fused_step compares the two paths)
    monkeypatch.setenv("EDGELLM_FUSED_STEP", "0")
    model, tok = engine
    pool = pool_for(model, fmt)
    paged = PromptCache(model, kv_format=KVFormat.parse(fmt), pool=pool)
    flat = PromptCache(model, 256, KVFormat.parse(fmt))
    ids = prompt_ids(37)
    for turn in (ids, ids + prompt_ids(9, 1), ids[:20] + prompt_ids(5, 2)):  # fresh, extension, divergence
        a = generate(model, tok, turn, 12, prompt_cache=paged)
        b = generate(model, tok, turn, 12, prompt_cache=flat)
        assert a.tokens == b.tokens and a.cached_tokens == b.cached_tokens
        # layer 0's K/V depend on the embeddings only; deeper layers see attention summed in another block order
        assert_same_states(paged, flat, exact_layers=1)
        assert pool.bytes_in_use == sum(layer.nbytes for layer in paged.layers)


@pytest.mark.parametrize("fmt", ["fp16", "q4"])
def test_memory_files_are_interchangeable_between_paged_and_contiguous(engine, tmp_path, fmt):
    model, tok = engine
    kv = KVFormat.parse(fmt)
    paged = PromptCache(model, kv_format=kv, pool=pool_for(model, fmt))
    generate(model, tok, prompt_ids(40), 5, prompt_cache=paged)
    save_memory(tmp_path / "p.safetensors", paged, model, tok.fingerprint)
    flat, _ = restore_memory(tmp_path / "p.safetensors", model, tok.fingerprint, kv)
    assert_same_states(paged, flat)

    pool = pool_for(model, fmt)
    direct, _ = restore_memory(tmp_path / "p.safetensors", model, tok.fingerprint, kv, pool=pool)
    assert_same_states(direct, paged)  # read straight into the blocks: the same bytes
    assert direct.tokens == paged.tokens and pool.bytes_in_use == sum(layer.nbytes for layer in direct.layers)

    back = PromptCache(model, kv_format=kv, pool=pool_for(model, fmt))
    for layer, src in zip(back.layers, flat.layers, strict=True):
        layer.load_state(src.state())
    back.tokens = list(flat.tokens)
    assert_same_states(back, flat)
    follow = [*flat.tokens, *prompt_ids(6, 3)]
    assert generate(model, tok, follow, 8, prompt_cache=back).tokens == \
        generate(model, tok, follow, 8, prompt_cache=flat).tokens == \
        generate(model, tok, follow, 8, prompt_cache=direct).tokens


def test_a_restore_into_a_pool_takes_no_block_unless_it_succeeds(engine, tmp_path):
    """Too few free blocks: PoolExhausted before anything is read; a damaged file: RestoreError; either way every
    block the restore took is back in the pool."""
    model, tok = engine
    kv = KVFormat.parse("q4")
    cache = PromptCache(model, kv_format=kv, pool=pool_for(model, "q4"))
    generate(model, tok, prompt_ids(40), 5, prompt_cache=cache)
    path = save_memory(tmp_path / "m.safetensors", cache, model, tok.fingerprint)
    layers, blocks = model.args.num_hidden_layers, -(-len(cache.tokens) // BLOCK)
    small = pool_for(model, "q4", blocks=layers * blocks - 1)
    with pytest.raises(PoolExhausted):
        restore_memory(path, model, tok.fingerprint, kv, pool=small)
    assert small.free_blocks == small.capacity_blocks
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's data
    path.write_bytes(bytes(data))
    pool = pool_for(model, "q4")
    with pytest.raises(RestoreError, match="checksum mismatch"):
        restore_memory(path, model, tok.fingerprint, kv, pool=pool)
    assert pool.free_blocks == pool.capacity_blocks


def test_trim_frees_whole_blocks_and_reserve_is_all_or_nothing(engine):
    model, _ = engine
    pool = pool_for(model, "fp16", blocks=8)
    cache = PagedKVCache(pool)
    cache.update_and_fetch(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    assert len(cache.table) == 3 and pool.bytes_in_use == 3 * pool.block_bytes
    cache.trim(10)  # 30 tokens: still 2 blocks
    assert len(cache.table) == 2 and cache.offset == 30
    cache.trim(30)
    assert cache.table == [] and pool.bytes_in_use == 0
    cache.reserve(8 * BLOCK)
    assert pool.free_blocks == 0
    other = PagedKVCache(pool)
    with pytest.raises(PoolExhausted):
        other.update_and_fetch(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert other.table == [] and other.offset == 0
    cache.trim(0)  # drops unused reservations
    assert pool.bytes_in_use == 0


def test_fork_is_copy_on_write(engine):
    model, _ = engine
    pool = pool_for(model, "q8", blocks=8)
    cache = PagedKVCache(pool)
    k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    cache.update_and_fetch(k, v)
    before = {n: t.clone() for n, t in cache.state().items()}
    child = cache.fork()
    assert child.table == cache.table and pool.bytes_in_use == 2 * pool.block_bytes  # shared, not copied
    child.update_and_fetch(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))  # writes into the shared tail
    assert child.table[0] == cache.table[0] and child.table[1] != cache.table[1]
    assert all(torch.equal(before[n], t) for n, t in cache.state().items())
    assert all(torch.equal(before[n], t[:, :, :20]) for n, t in child.state().items())
    cache.release()
    assert pool.bytes_in_use == 2 * pool.block_bytes  # the child still holds block 0 and its copy
    del child
    assert pool.bytes_in_use == 0  # a dropped cache's blocks go back to the pool


def test_arena_is_allocated_once_and_budget_is_never_exceeded(engine):
    model, tok = engine
    pool = pool_for(model, "q4", blocks=18)  # three caches of 40 tokens, 3 blocks a layer
    ptr, budget = pool.arena.data_ptr(), pool.arena.numel()
    caches = [PromptCache(model, pool=pool) for _ in range(3)]
    for i, cache in enumerate(caches):
        generate(model, tok, prompt_ids(30, i), 10, prompt_cache=cache)
        assert pool.arena.data_ptr() == ptr and pool.bytes_in_use <= budget
    with pytest.raises(PoolExhausted):
        generate(model, tok, prompt_ids(30, 9), 10, prompt_cache=PromptCache(model, pool=pool))
    assert pool.arena.data_ptr() == ptr and pool.bytes_in_use <= budget


def test_paged_kivi_is_refused(engine):
    model, _ = engine
    with pytest.raises(InvalidRequestError, match="not supported"):
        BlockPool(model.args, KVFormat.parse("q4-kivi"), 1 << 20, BLOCK)


def test_shared_system_prompt_is_held_once_and_generations_match(engine):
    model, tok = engine
    system = prompt_ids(600)
    questions = [system + prompt_ids(7, 1), system + prompt_ids(11, 2)]
    # The fork prefills only the question, which attends to the 600 cached tokens as quantized (a prefill chunk sees
    # only its own K/V exactly), so its contiguous twin holds the system prompt before it sees the question.
    fresh, twin = (PromptCache(model, 1024, KVFormat.parse("q4")) for _ in range(2))
    generate(model, tok, system, 1, prompt_cache=twin)
    expected = [generate(model, tok, questions[0], 10, prompt_cache=fresh).tokens,
                generate(model, tok, questions[1], 10, prompt_cache=twin).tokens]

    pool = pool_for(model, "q4", blocks=200)
    first = PromptCache(model, pool=pool)
    assert generate(model, tok, questions[0], 10, prompt_cache=first).tokens == expected[0]
    alone = pool.bytes_in_use
    second = first.fork(questions[1])
    assert len(second.tokens) == 600
    result = generate(model, tok, questions[1], 10, prompt_cache=second)
    assert result.tokens == expected[1] and result.cached_tokens == 600
    assert pool.bytes_in_use < 2 * alone
    shared_blocks = 600 // BLOCK * model.args.num_hidden_layers
    assert pool.bytes_in_use <= 2 * alone - shared_blocks * pool.block_bytes


def test_agent_store_with_a_pool_evicts_to_disk_and_restores(engine, tmp_path):
    model, tok = engine
    fmt = "q4"
    probe = pool_for(model, fmt, blocks=1)
    layers = model.args.num_hidden_layers
    budget = 3 * (48 // BLOCK) * layers * probe.block_bytes  # room for about three agents of ~40 tokens
    store = AgentStore(tmp_path, model, tok, fmt, pool_bytes=budget, block_tokens=BLOCK)
    prompts = {f"a{i}": prompt_ids(30, i) for i in range(6)}
    answers = {}
    for name, ids in prompts.items():
        answers[name] = store.agent(name).generate(ids, 10).tokens
        assert store.live_bytes() == store.pool.bytes_in_use <= budget
    assert store.evictions >= 3 and len(store.live) <= 3
    for name, ids in prompts.items():
        agent = store.agent(name)
        assert agent.restore_note is None and len(agent.cache.tokens) == 39  # the last answer token is never fed back
        follow = [*agent.cache.tokens, *prompt_ids(4, 99)]
        flat = PromptCache(model, 256, KVFormat.parse(fmt))
        flat_result = generate(model, tok, ids, 10, prompt_cache=flat)
        assert flat_result.tokens == answers[name]
        assert agent.generate(follow, 3).tokens == generate(model, tok, follow, 3, prompt_cache=flat).tokens
        assert store.pool.bytes_in_use <= budget


def test_agent_store_fork_shares_the_system_prompt(engine, tmp_path):
    model, tok = engine
    store = AgentStore(tmp_path, model, tok, "fp16", pool_bytes=pool_for(model, "fp16", 40).arena.numel(),
                       block_tokens=BLOCK)
    system = prompt_ids(64)
    store.agent("base").generate(system, 1)
    held = store.live_bytes()
    child = store.fork("base", "child")
    assert store.live_bytes() == held
    question = [*system, *prompt_ids(5, 4)]
    result = child.generate(question, 6)
    flat = PromptCache(model, 256, KVFormat.parse("fp16"))
    assert result.cached_tokens == 64 and result.tokens == generate(model, tok, question, 6, prompt_cache=flat).tokens


def states(cache: PromptCache) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in layer.state().items()} for layer in cache.layers]


@pytest.mark.parametrize("fmt", ["fp32", "q4"])
def test_published_blocks_are_adopted_stored_once_and_never_written(engine, fmt, monkeypatch):
    monkeypatch.setenv("EDGELLM_FUSED_STEP", "0")  # both sides op at a time (see the first test)
    model, tok = engine
    pool = pool_for(model, fmt, blocks=400)
    system = prompt_ids(3 * BLOCK + 5)
    question = [*system, *prompt_ids(9, 1)]
    first = PromptCache(model, pool=pool)
    generate(model, tok, system, 4, prompt_cache=first)
    first.publish()
    before = states(first)
    # the reference: a contiguous cache that holds the system prompt, then sees the question (what adopting gives)
    twin = PromptCache(model, 256, KVFormat.parse(fmt))
    generate(model, tok, system, 1, prompt_cache=twin)
    expected = generate(model, tok, question, 6, prompt_cache=twin).tokens

    second = PromptCache(model, pool=pool)
    assert second.adopt(question) == 3 * BLOCK  # whole blocks only: the 5 tokens past them are first's own
    used = pool.bytes_in_use
    assert [layer.table[:3] for layer in second.layers] == [layer.table[:3] for layer in first.layers]
    result = generate(model, tok, question, 6, prompt_cache=second)
    assert result.tokens == expected and result.cached_tokens == 3 * BLOCK
    # the shared blocks were stored once: the second cache added only its own tail
    tail = -(-(len(question) + 6 - 1) // BLOCK) - 3
    assert pool.bytes_in_use - used == tail * model.args.num_hidden_layers * pool.block_bytes
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, states(first), strict=True) for k in a)

    # the owner alone diverging inside a published block copies it first, so what others adopt stays the system
    # prompt's (the copied block and the third, both freed, are no longer published)
    second.release()
    first.reuse([*system[:BLOCK + 3], *prompt_ids(40, 2)])
    generate(model, tok, [*system[:BLOCK + 3], *prompt_ids(40, 2)], 2, prompt_cache=first)
    third = PromptCache(model, pool=pool)
    assert third.adopt(question) == BLOCK
    held = [{k: v[:, :, :BLOCK] for k, v in s.items()} for s in before]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(held, states(third), strict=True) for k in a)


def test_freed_blocks_are_unpublished(engine):
    model, tok = engine
    pool = pool_for(model, "fp16")
    ids = prompt_ids(2 * BLOCK + 1)
    cache = PromptCache(model, pool=pool)
    generate(model, tok, ids, 1, prompt_cache=cache)
    cache.publish()
    assert len(pool.lookup(ids, len(ids))) == 2
    cache.release()
    assert pool.lookup(ids, len(ids)) == [] and not pool.published and pool.free_blocks == pool.capacity_blocks


def test_a_restored_agent_shares_the_blocks_live_agents_published(engine, tmp_path):
    model, tok = engine
    probe = pool_for(model, "q8", blocks=1)
    store = AgentStore(tmp_path, model, tok, "q8", pool_bytes=300 * probe.block_bytes, block_tokens=BLOCK)
    system = prompt_ids(4 * BLOCK)
    store.agent("a").generate([*system, *prompt_ids(6, 1)], 3)
    store.agent("b").generate([*system, *prompt_ids(6, 2)], 3)
    stats = store.stats()
    assert stats["shared_blocks"] == 4 * model.args.num_hidden_layers
    assert stats["live_bytes"] < stats["logical_bytes"]
    store.evict("a")
    saved = restore_memory(store.path("a"), model, tok.fingerprint, store.kv_format)[0]
    restored = store.agent("a")
    assert [layer.table[:4] for layer in restored.cache.layers] == [layer.table[:4] for layer in
                                                                   store.live["b"].cache.layers]
    assert restored.cache.tokens == saved.tokens
    assert_same_states(restored.cache, saved)
    described = store.describe("a")
    assert described["private_bytes"] < described["live_bytes"]

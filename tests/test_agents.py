"""Persistent agent memory: bit-exact round trips, prefix reuse, refusal of bad files, eviction under a budget."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgellm import load
from edgellm.agents import AgentStore
from edgellm.errors import InvalidRequestError
from edgellm.generate import generate
from edgellm.kv.persist import (
    HEADER_CHECKSUM,
    RestoreError,
    header_checksum,
    parse_header,
    read_metadata,
    restore_memory,
    tensor_crc32,
)
from edgellm.kv.prompt_cache import PromptCache
from edgellm.runner import prefill_tokens

FORMATS = ["fp32", "fp16", "q8", "q4", "q2", "q4-kivi"]
PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"


@pytest.fixture(scope="module")
def engine(llama_dir):
    model, tok = load(llama_dir, "fp32")
    tok.eos_token_ids = set()
    return model, tok


def states(cache: PromptCache) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in layer.state().items()} for layer in cache.layers]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_bit_identical_and_generation_continues_the_same(engine, tmp_path, fmt):
    model, tok = engine
    store = AgentStore(tmp_path, model, tok, fmt)
    agent = store.agent("alice")
    agent.generate(PROMPT, 12)
    before = states(agent.cache)
    tokens = list(agent.cache.tokens)
    agent.save()
    follow_up = tokens + tok.encode(" + fibonacci(n - 2)", add_special_tokens=False)
    expected = agent.generate(follow_up, 10).tokens  # never saved/restored from here on

    restored = AgentStore(tmp_path, model, tok, fmt).agent("alice")
    assert restored.restore_note is None and restored.cache.tokens == tokens
    for a, b in zip(before, states(restored.cache), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
    result = restored.generate(follow_up, 10)
    assert result.cached_tokens == len(tokens)
    assert result.tokens == expected


def logits_after(model, cache: PromptCache, ids: list[int]) -> torch.Tensor:
    keep = cache.reuse(ids)
    return prefill_tokens(model, ids[keep:], cache)


@pytest.mark.parametrize("case", ["identical", "extension", "divergence", "generated"])
def test_prefix_reuse_matches_full_prefill(engine, case):
    model, tok = engine
    base = tok.encode(PROMPT)
    cache = PromptCache(model, 64)
    logits_after(model, cache, base)
    if case == "identical":
        ids = base
    elif case == "extension":
        ids = base + tok.encode(" + 1", add_special_tokens=False)
    elif case == "divergence":
        ids = base[:7] + tok.encode(" while True:", add_special_tokens=False)
    else:
        result = generate(model, tok, base, 8, prompt_cache=cache)
        ids = base + result.tokens + tok.encode("\n", add_special_tokens=False)
    reused_before = len(cache.tokens)
    warm = logits_after(model, cache, ids)
    cold = prefill_tokens(model, ids, PromptCache(model, 64))
    assert torch.allclose(warm, cold, atol=1e-4)
    assert cache.tokens == ids
    if case == "generated":
        assert reused_before >= len(base) + 7  # the generated tokens' KV was kept, not re-prefilled


def saved_agent(engine, root: Path, fmt: str = "q4", name: str = "bob") -> tuple[AgentStore, Path]:
    model, tok = engine
    store = AgentStore(root, model, tok, fmt)
    store.agent(name).generate(PROMPT, 4)
    return store, store.save(store.agent(name))


def assert_refused(engine, root: Path, fmt: str, reason: str, name: str = "bob") -> None:
    model, tok = engine
    kv_format = AgentStore(root, model, tok, fmt).kv_format
    with pytest.raises(RestoreError, match=reason):
        restore_memory(root / f"{name}.safetensors", model, tok.fingerprint, kv_format)
    agent = AgentStore(root, model, tok, fmt).agent(name)  # falls back: empty memory, reason kept
    assert agent.cache.tokens == []
    assert agent.restore_note


def test_truncated_file_is_refused(engine, tmp_path):
    _, path = saved_agent(engine, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    assert_refused(engine, tmp_path, "q4", "damaged|truncated|inconsistent")


def test_flipped_byte_is_refused(engine, tmp_path):
    _, path = saved_agent(engine, tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # inside the last tensor's payload
    path.write_bytes(bytes(data))
    assert_refused(engine, tmp_path, "q4", "checksum mismatch")


def test_a_saved_header_is_not_parsed_again_and_the_data_is_still_checked(engine, tmp_path):
    """A process remembers the headers it wrote or read (by their exact bytes): restoring an agent it saved parses
    nothing, yet every data byte is still checksummed, and the metadata handed out is the caller's own copy."""
    model, tok = engine
    store, path = saved_agent(engine, tmp_path)
    before = parse_header.cache_info()
    _, meta = restore_memory(path, model, tok.fingerprint, store.kv_format)
    after = parse_header.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    meta["messages"] = "edited by the caller"
    assert restore_memory(path, model, tok.fingerprint, store.kv_format)[1]["messages"] != meta["messages"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # the same header bytes, one data bit flipped
    path.write_bytes(bytes(data))
    hits = parse_header.cache_info().hits
    with pytest.raises(RestoreError, match="checksum mismatch"):
        restore_memory(path, model, tok.fingerprint, store.kv_format)
    assert parse_header.cache_info().hits == hits + 1


def rewrite_metadata(path: Path, resign: bool = True, **changes: str) -> None:
    """Edit a safetensors file's metadata in place (re-encoding the header), keeping the tensor bytes.

    With `resign`, the header checksum is recomputed: the file is then a well-formed one from another model,
    tokenizer or version; without it, an edited one.
    """
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"].update(changes)
    if resign:
        header["__metadata__"][HEADER_CHECKSUM] = header_checksum(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_other_model_tokenizer_format_and_future_version_are_refused(engine, tmp_path):
    _, path = saved_agent(engine, tmp_path)
    original = path.read_bytes()
    rewrite_metadata(path, model_fingerprint="0" * 32)
    assert_refused(engine, tmp_path, "q4", "different model")
    path.write_bytes(original)
    rewrite_metadata(path, tokenizer_fingerprint="0" * 32)
    assert_refused(engine, tmp_path, "q4", "different tokenizer")
    path.write_bytes(original)
    assert_refused(engine, tmp_path, "q8", "KV format")
    rewrite_metadata(path, edgellm_format="99")
    assert_refused(engine, tmp_path, "q4", "newer edgellm")


def test_memory_from_another_checkpoint_is_refused(engine, checkpoint, tmp_path):
    _, tok = engine
    other, _ = load(checkpoint("llama", seed=7), "fp32")
    saved_agent(engine, tmp_path)
    with pytest.raises(RestoreError, match="different model"):
        restore_memory(tmp_path / "bob.safetensors", other, tok.fingerprint,
                       AgentStore(tmp_path, other, tok, "q4").kv_format)


def test_failed_save_leaves_previous_file_intact(engine, tmp_path, monkeypatch):
    store, path = saved_agent(engine, tmp_path)
    before = path.read_bytes()
    agent = store.agent("bob")
    agent.generate(PROMPT + " * 2", 4)

    def crash(path, tensors, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("edgellm.kv.persist.write_safetensors", crash)
    with pytest.raises(OSError):
        agent.save()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bob.safetensors"]


def _save_repeatedly(root: str, model_dir: str, n: int, seed: int) -> None:
    model, tok = load(model_dir, "fp32")
    store = AgentStore(root, model, tok, "q4")
    agent = store.agent("shared")
    for i in range(n):
        agent.cache = PromptCache(model, 64, store.kv_format)
        agent.generate(f"{PROMPT} # writer {seed} round {i}", 2)
        agent.save()


@pytest.mark.slow
def test_concurrent_saves_never_tear_the_file(engine, llama_dir, tmp_path):
    model, tok = engine
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_save_repeatedly, args=(str(tmp_path), str(llama_dir), 8, s)) for s in (1, 2)]
    for w in writers:
        w.start()
    store = AgentStore(tmp_path, model, tok, "q4")
    reads = 0
    while any(w.is_alive() for w in writers):
        if (tmp_path / "shared.safetensors").exists():
            restore_memory(tmp_path / "shared.safetensors", model, tok.fingerprint, store.kv_format)
            reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    restore_memory(tmp_path / "shared.safetensors", model, tok.fingerprint, store.kv_format)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".hidden", "", "x" * 200])
def test_path_traversal_names_rejected(engine, tmp_path, name):
    model, tok = engine
    with pytest.raises(InvalidRequestError, match="invalid agent name"):
        AgentStore(tmp_path, model, tok).agent(name)


def test_eviction_under_budget_keeps_every_agent(engine, tmp_path):
    model, tok = engine
    probe = AgentStore(tmp_path / "probe", model, tok, "q4").agent("p")
    one_agent = probe.nbytes
    store = AgentStore(tmp_path, model, tok, "q4", budget_bytes=int(2.5 * one_agent))
    expected = {}
    for i in range(5):
        agent = store.agent(f"agent{i}")
        expected[f"agent{i}"] = agent.generate(f"{PROMPT} # {i}", 4)
        assert store.live_bytes() <= store.budget_bytes
    assert store.evictions >= 3 and len(store.live) <= 2
    for i, (name, first) in enumerate(expected.items()):
        agent = store.agent(name)
        assert store.live_bytes() <= store.budget_bytes
        assert agent.restore_note is None
        # the memory holds the prompt and every generated token but the last (which never ran through the model)
        assert agent.cache.tokens == tok.encode(f"{PROMPT} # {i}") + first.tokens[:-1]


def test_chat_messages_survive_restart(engine, tmp_path):
    model, tok = engine
    first = AgentStore(tmp_path, model, tok, "q8").agent("carol")
    first.chat("hello", 4)
    first.save()
    control = first.chat("and again", 6).tokens
    resumed = AgentStore(tmp_path, model, tok, "q8").agent("carol")
    assert [m["role"] for m in resumed.messages] == ["user", "assistant"]
    assert resumed.chat("and again", 6).tokens == control


def restored_or_refused(engine, path: Path, kv_format) -> tuple[list[int], list[dict[str, torch.Tensor]], list] | None:
    model, tok = engine
    try:
        cache, meta = restore_memory(path, model, tok.fingerprint, kv_format)
    except RestoreError:
        return None
    return cache.tokens, states(cache), json.loads(meta["messages"])


def test_every_single_bit_flip_is_refused_or_harmless(engine, tmp_path):
    """Flip one bit at a time across the whole file (length prefix, JSON header, tensor bytes): a restore either
    refuses or yields exactly the saved tokens, K/V and messages; never a silently different cache."""
    model, tok = engine
    store = AgentStore(tmp_path, model, tok, "q4")
    agent = store.agent("bob")
    agent.chat("hi", 3)
    path = store.save(agent)
    original = path.read_bytes()
    expected = restored_or_refused(engine, path, store.kv_format)
    assert expected is not None and expected[0] == agent.cache.tokens and expected[2] == agent.messages
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    gen = torch.Generator().manual_seed(0)
    # every byte of the length prefix, 160 bits in the header, 120 in the tensor bytes: 352 flips
    positions = [*range(8), *torch.randint(8, header_end, (160,), generator=gen).tolist(),
                 *torch.randint(header_end, len(original), (120,), generator=gen).tolist()]
    bits = torch.randint(0, 8, (len(positions),), generator=gen).tolist()
    refused = 0
    for pos, bit in zip(positions, bits, strict=True):
        data = bytearray(original)
        data[pos] ^= 1 << bit
        path.write_bytes(bytes(data))
        got = restored_or_refused(engine, path, store.kv_format)
        if got is None:
            refused += 1
            continue
        tokens, restored, messages = got
        assert tokens == expected[0] and messages == expected[2], f"flip at byte {pos} bit {bit} restored wrongly"
        for a, b in zip(expected[1], restored, strict=True):
            assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), f"flip at {pos}.{bit}"
    assert refused >= len(positions) * 0.9  # nearly every flip changes something that decides the state


@pytest.mark.parametrize("edit", ["message", "num_tokens", "predicted"])
def test_edited_header_is_refused(engine, tmp_path, edit):
    model, tok = engine
    store = AgentStore(tmp_path, model, tok, "q4")
    agent = store.agent("bob")
    agent.chat("hi", 3)
    path = store.save(agent)
    if edit == "message":
        change = {"messages": json.dumps([{"role": "user", "content": "hj"}, agent.messages[1]])}
    elif edit == "num_tokens":
        change = {"num_tokens": str(len(agent.cache.tokens) - 1)}
    else:
        change = {"predicted": "1"}
    rewrite_metadata(path, resign=False, **change)
    assert_refused(engine, tmp_path, "q4", "header checksum mismatch")


def test_edited_token_id_is_refused(engine, tmp_path):
    """One token id changed by one in the file, as a hand edit would: its K/V belong to other tokens."""
    store, path = saved_agent(engine, tmp_path)
    agent = store.agent("bob")
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8:8 + n])["tokens"]["data_offsets"]
    ids = torch.frombuffer(data[8 + n + begin:8 + n + end], dtype=torch.int32)
    assert ids.tolist() == agent.cache.tokens
    ids[1] += 1
    data[8 + n + begin:8 + n + end] = ids.numpy().tobytes()
    path.write_bytes(bytes(data))
    assert_refused(engine, tmp_path, "q4", "checksum mismatch in tokens")


def test_memory_file_is_safetensors_with_aligned_data(engine, tmp_path):
    """The file is one the safetensors library reads back to the saved tensors, bit for bit, and its data starts
    on a 64-byte boundary (aligned copies into the cache)."""
    store, path = saved_agent(engine, tmp_path)
    agent = store.agent("bob")
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (8 + n) % 64 == 0
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("tokens").tolist() == agent.cache.tokens
        saved = {k: f.get_tensor(k) for k in f.keys() if k != "tokens"}
    held = {f"layers.{i}.{k}": t for i, layer in enumerate(agent.cache.layers) for k, t in layer.state().items()}
    assert saved.keys() == held.keys()
    assert all(saved[k].dtype == held[k].dtype and torch.equal(saved[k], held[k]) for k in held)


def as_format_2(path: Path) -> None:
    """Rewrite a memory file as format 2 wrote it: no token tensor, the ids a JSON list in the checksummed header,
    written by safetensors' own writer (data aligned to 8 bytes only)."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tokens = tensors.pop("tokens").tolist()
    checksums = {k: v for k, v in json.loads(meta["checksums"]).items() if k != "tokens"}
    meta |= {"edgellm_format": "2", "tokens": json.dumps(tokens), "checksums": json.dumps(checksums, sort_keys=True)}
    meta[HEADER_CHECKSUM] = header_checksum(meta)
    save_file(tensors, str(path), metadata=meta)


def test_format_2_files_still_restore_and_are_saved_as_format_3(engine, tmp_path):
    """An upgrade keeps every saved agent: a file of the previous format restores to the same tokens, K/V and
    messages, and its next save is in the current format."""
    model, tok = engine
    store, path = saved_agent(engine, tmp_path)
    kv_format = store.kv_format
    expected = restored_or_refused(engine, path, kv_format)
    as_format_2(path)
    assert read_metadata(path)["edgellm_format"] == "2"
    got = restored_or_refused(engine, path, kv_format)
    assert got is not None and got[0] == expected[0] and got[2] == expected[2]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(expected[1], got[1], strict=True) for k in a)
    agent = AgentStore(tmp_path, model, tok, "q4").agent("bob")
    assert agent.restore_note is None and agent.cache.tokens == expected[0]
    agent.save()
    assert read_metadata(path)["edgellm_format"] == "3"
    as_format_2(path)
    tokens = list(expected[0])
    tokens[1] = (tokens[1] + 1) % 300  # one id edited by hand: the header checksum covers format 2's list
    rewrite_metadata(path, resign=False, tokens=json.dumps(tokens))
    assert_refused(engine, tmp_path, "q4", "header checksum mismatch")


def test_reinterpreted_tensor_dtype_is_refused(engine, tmp_path):
    """Same bytes, another dtype in the safetensors header: the per-tensor CRC covers the layout too."""
    _, path = saved_agent(engine, tmp_path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "U8")  # q4 codes
    header[key]["dtype"] = "I8"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    assert_refused(engine, tmp_path, "q4", "checksum mismatch|do not fit|no KV cache holds")
    codes = torch.arange(64, dtype=torch.uint8)
    assert len({tensor_crc32(codes), tensor_crc32(codes.view(torch.int8)), tensor_crc32(codes.view(8, 8))}) == 3


@pytest.mark.parametrize("edit", ["float size", "bool size", "short span"])
def test_every_tensor_of_a_shared_layout_is_checked(engine, tmp_path, edit):
    """The header check runs once per distinct layout, yet a later tensor of the same layout whose shape is written
    differently (32.0, true for 1) or whose byte span no longer fits is refused, as the first one would be."""
    _, path = saved_agent(engine, tmp_path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    first, *later = sorted((k for k in header if k.endswith(".keys.data")), key=lambda k: header[k]["data_offsets"])
    assert later and all(header[k]["shape"] == header[first]["shape"] for k in later)
    entry = header[later[-1]]
    if edit == "float size":
        entry["shape"] = [*entry["shape"][:-1], float(entry["shape"][-1])]
    elif edit == "bool size":
        entry["shape"] = [True if d == 1 else d for d in entry["shape"]]
    else:
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] - 1]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    assert_refused(engine, tmp_path, "q4", "is not a list of sizes|disagree")


def test_stale_temp_files_are_removed_on_open(engine, tmp_path):
    model, tok = engine
    saved_agent(engine, tmp_path)
    dead = tmp_path / ".bob.safetensors.999999999.abc123.tmp"  # no such PID, two minutes old
    fresh = tmp_path / ".bob.safetensors.999999998.jkl012.tmp"  # no such PID here, but just written: kept
    live = tmp_path / f".bob.safetensors.{os.getpid()}.def456.tmp"  # a writer still running
    old = tmp_path / f".bob.safetensors.{os.getpid()}.ghi789.tmp"  # two hours old: stale whatever its PID
    for p in (dead, fresh, live, old):
        p.write_bytes(b"partial")
    os.utime(dead, (time.time() - 120, time.time() - 120))
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store = AgentStore(tmp_path, model, tok, "q4")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bob.safetensors", fresh.name, live.name])
    assert store.agent("bob").restore_note is None

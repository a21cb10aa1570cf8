"""TTFT of a returning agent: cold prefill vs its cache in RAM vs its cache restored from disk, with the file's pages
dropped from the page cache and with them cached (warm).

The page cache is dropped with posix_fadvise and checked with mincore, so the report says whether each restore
really read from the disk.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time
from pathlib import Path

from torch import nn

from edgellm.bench.kv.common import Subject, random_ids
from edgellm.kv.formats import KVFormat
from edgellm.kv.persist import parse_header, restore_memory, save_memory
from edgellm.kv.pool import BlockPool
from edgellm.kv.prompt_cache import PromptCache
from edgellm.runner import prefill_tokens

LONG_PROMPT = 2048  # past this many tokens a cold prefill takes seconds: it is timed once, not --reps times


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache, asked with mincore(2); None where that cannot be asked."""
    size = path.stat().st_size
    if not size or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            asked = libc.mincore(addr, size, vec) == 0
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec) / pages if asked else None


def drop_page_cache(path: Path) -> float | None:
    """fsync the file and ask the kernel to drop its cached pages; returns the share still resident afterwards."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


def _page_cache_state(resident: list[float | None]) -> str:
    if any(r is None for r in resident):
        return "unknown"
    return "cold" if max(resident) == 0 else f"warm ({max(resident):.0%} resident)"


def _read_into_buffer(path: Path, buffer: bytearray) -> None:
    """The file's bytes read into `buffer`, already faulted in: the cheapest plain read, a second baseline beside
    read_bytes (whose fresh allocation may or may not be faulted in, depending on the size and malloc's history)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            got = os.preadv(fd, [view[done:]], done)
            if not got:
                raise OSError(f"{path} ended early")
            done += got
    finally:
        os.close(fd)


def _warm_up(model: nn.Module, fmt: KVFormat) -> None:
    """One short prefill and decode step per format, so first-call allocations are not timed."""
    cache = PromptCache(model, 65, fmt)
    prefill_tokens(model, list(range(64)), cache)
    prefill_tokens(model, [0], cache)


def _pool_for(model: nn.Module, fmt: KVFormat, tokens: int) -> BlockPool:
    """A block pool (the server's KV memory) just large enough for one agent of `tokens` tokens."""
    probe = BlockPool(model.args, fmt, 1 << 20, dtype=model.dtype)
    blocks = -(-tokens // probe.block_tokens) * model.args.num_hidden_layers
    return BlockPool(model.args, fmt, blocks * probe.block_bytes, dtype=model.dtype)


def _ttft(subject: Subject, fmt: KVFormat, prompt: list[int], new_token: int, reps: int, workdir: Path) -> dict:
    """TTFT of a cold prefill vs the agent returning with one new token, its cache in RAM or restored from disk."""
    model, fingerprint, n = subject.model, subject.tokenizer.fingerprint, len(prompt)
    turn = [*prompt, new_token]
    cold = []
    for _ in range(reps if n <= LONG_PROMPT else 1):
        t0 = time.perf_counter()
        cache = PromptCache(model, n + 1, fmt)
        int(prefill_tokens(model, prompt, cache).argmax())
        cold.append(time.perf_counter() - t0)
    path = save_memory(workdir / f"{fmt}-{n}.safetensors", cache, model, fingerprint)
    ram = []
    for _ in range(reps):
        t0 = time.perf_counter()
        cached = cache.reuse(turn)
        ram_token = int(prefill_tokens(model, turn[cached:], cache).argmax())
        ram.append(time.perf_counter() - t0)
        for layer in cache.layers:  # forget the new token: the next rep returns to the same state
            layer.trim(1)
        cache.tokens.pop()
    raw, restore, disk, resident = [], [], [], []
    for _ in range(reps):
        resident.append(drop_page_cache(path))
        t0 = time.perf_counter()
        path.read_bytes()
        raw.append(time.perf_counter() - t0)
        resident.append(drop_page_cache(path))
        t0 = time.perf_counter()
        restored, _ = restore_memory(path, model, fingerprint, fmt)
        t1 = time.perf_counter()
        cached = restored.reuse(turn)
        disk_token = int(prefill_tokens(model, turn[cached:], restored).argmax())
        disk.append(time.perf_counter() - t0)
        restore.append(t1 - t0)
        del restored  # freed here, untimed: else the next rep's assignment frees it inside its timing
    warm_raw, warm_into, warm_restore, warm_disk, warm_pool, warm_unseen = [], [], [], [], [], []
    path.read_bytes()  # the file's pages stay cached now: a returning agent whose file was written or read lately
    reused = bytearray(path.stat().st_size)
    _read_into_buffer(path, reused)  # untimed: its pages are faulted in now
    pool = _pool_for(model, fmt, n) if BlockPool.supports(fmt) else None
    for _ in range(reps):
        t0 = time.perf_counter()
        path.read_bytes()
        warm_raw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _read_into_buffer(path, reused)
        warm_into.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        restored, _ = restore_memory(path, model, fingerprint, fmt)
        t1 = time.perf_counter()
        int(prefill_tokens(model, turn[restored.reuse(turn):], restored).argmax())
        warm_disk.append(time.perf_counter() - t0)
        warm_restore.append(t1 - t0)
        del restored
        if pool is not None:  # the server's path: straight into the blocks of its pool
            t0 = time.perf_counter()
            paged, _ = restore_memory(path, model, fingerprint, fmt, pool=pool)
            warm_pool.append(time.perf_counter() - t0)
            paged.release()
            del paged
            parse_header.cache_clear()  # as after a restart: a header this process neither wrote nor read
            t0 = time.perf_counter()
            paged, _ = restore_memory(path, model, fingerprint, fmt, pool=pool)
            warm_unseen.append(time.perf_counter() - t0)
            paged.release()
            del paged
    file_bytes = path.stat().st_size
    path.unlink()
    best = {"cold": min(cold), "ram": min(ram), "disk": min(disk), "restore": min(restore), "raw": min(raw),
            "warm_disk": min(warm_disk), "warm_restore": min(warm_restore), "warm_raw": min(warm_raw),
            "warm_into": min(warm_into)}
    return {"context": n, "format": str(fmt), "model": subject.name, "random_weights": subject.random_weights,
            "cold_ttft_s": best["cold"], "ram_ttft_s": best["ram"], "disk_ttft_s": best["disk"],
            "restore_s": best["restore"], "raw_read_s": best["raw"],
            "cold_over_disk": best["cold"] / best["disk"], "cold_over_ram": best["cold"] / best["ram"],
            "restore_over_raw_read": best["restore"] / best["raw"],
            "warm_disk_ttft_s": best["warm_disk"], "warm_restore_s": best["warm_restore"],
            "warm_raw_read_s": best["warm_raw"], "cold_over_warm_disk": best["cold"] / best["warm_disk"],
            "warm_restore_over_raw_read": best["warm_restore"] / best["warm_raw"],
            "warm_raw_into_reused_s": best["warm_into"],
            "warm_pool_restore_s": min(warm_pool) if warm_pool else None,
            "warm_pool_restore_over_raw_read": min(warm_pool) / best["warm_raw"] if warm_pool else None,
            "warm_pool_restore_unseen_s": min(warm_unseen) if warm_unseen else None,
            "warm_pool_restore_unseen_over_raw_read": min(warm_unseen) / best["warm_raw"] if warm_unseen else None,
            "warm_restore_over_raw_into_reused": best["warm_restore"] / best["warm_into"],
            "file_bytes": file_bytes, "file_bytes_per_token": file_bytes / n,
            "page_cache": _page_cache_state(resident),
            "resident_after_drop": None if None in resident else max(resident),
            "same_first_token_ram_disk": ram_token == disk_token,
            "reps_s": {"cold": cold, "ram": ram, "disk": disk, "restore": restore, "raw_read": raw,
                       "warm_disk": warm_disk, "warm_restore": warm_restore, "warm_raw_read": warm_raw,
                       "warm_raw_into_reused": warm_into, "warm_pool_restore": warm_pool,
                       "warm_pool_restore_unseen": warm_unseen}}


def measure(args: argparse.Namespace, main: Subject, twin: Subject | None, workdir: Path) -> list[dict]:
    """Every (context, format) row, on the real model where the prompt fits its window, else on the twin."""
    ids = random_ids(main.model.args.vocab_size, max(args.contexts) + 1, args.seed)
    window, contexts = main.model.args.max_position_embeddings, sorted(set(args.contexts))
    rows = []
    for subject, lengths in ((main, [n for n in contexts if n < window]), (twin, [n for n in contexts if n >= window])):
        if not lengths:
            continue
        for fmt in args.formats:
            _warm_up(subject.model, fmt)
            for n in lengths:
                print(f"[bench kv] ttft {fmt} {n} tokens on {subject.name}", file=sys.stderr)
                rows.append(_ttft(subject, fmt, ids[:n], ids[n], args.reps, workdir))
    return sorted(rows, key=lambda r: r["context"])

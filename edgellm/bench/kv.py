"""`edgellm bench kv`: per-agent KV memory: returning-agent TTFT, agents per budget, quality, peak memory, batching.

Each section measures one claim of persistent agent memory against its target. TTFT compares three ways to answer
an agent that comes back with one new token: a cold prefill of the whole prompt, its cache still in RAM, and its
cache restored from disk with the file's page cache dropped first (and checked with mincore, so the report says
whether the read really went to the disk). Sizes and attention memory use caches filled with random K/V: bytes do
not depend on the values, and no prefill is paid for them.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

import edgellm
from edgellm.bench.common import positive_int, positive_ints, write_report
from edgellm.bench.speed import RANDOM_LLAMAS, build_random_llama
from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.generate import batch_generate, generate
from edgellm.kv.formats import KVFormat
from edgellm.kv.persist import restore_memory, save_memory
from edgellm.kv.prompt_cache import PromptCache
from edgellm.kv.quantized import measure_peak_bytes
from edgellm.loader import load_model, resolve_dtype
from edgellm.perf import measure_hardware
from edgellm.perf.hardware import dtype_name
from edgellm.runner import prefill_tokens
from edgellm.tokenizer import Tokenizer

SECTIONS = ("ttft", "capacity", "quality", "memory", "batch")
LONG_PROMPT = 2048  # past this many tokens a cold prefill takes seconds: it is timed once, not --reps times
QUALITY_CHUNK = 256  # tokens per forward pass, so later chunks attend to an already quantized past
FILL_CHUNK = 2048  # random K/V tokens written per call when filling a cache
PPL_TARGETS = {"q8": 0.1, "q4": 1.0, "q2": 5.0}  # max perplexity increase (%) vs the dense cache, best scheme
GIB, MIB = 2**30, 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="HF model directory (default: edgellm's built-in model); "
                        "TTFT contexts past its window run on a random-init model of the same shape")
    source.add_argument("--random-llama", choices=sorted(RANDOM_LLAMAS), default=None,
                        help="a random-init Llama of this size, its window raised to the longest context "
                             "(no quality section: random weights)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="model dtype (auto: bf16 where the CPU has it natively, else fp32)")
    p.add_argument("--formats", type=_formats, default="fp16,q8,q4,q2,q4-kivi-h,q2-kivi-h",
                   help="KV formats compared, comma-separated (e.g. q4-kivi-h)")
    p.add_argument("--contexts", type=positive_ints, default="1024,4096", help="TTFT prompt tokens")
    p.add_argument("--reps", type=positive_int, default=3,
                   help=f"timed repetitions, best kept (cold prefills past {LONG_PROMPT} tokens run once)")
    p.add_argument("--budget-gib", type=float, default=1.0, help="memory budget of the capacity section")
    p.add_argument("--agent-context", type=positive_int, default=4096, help="tokens per agent, capacity section")
    p.add_argument("--quality-tokens", type=positive_int, default=2048, help="held-out stdlib tokens scored")
    p.add_argument("--memory-context", type=positive_int, default=16384, help="cached tokens, memory section")
    p.add_argument("--batch", type=positive_ints, default="1,2,4,8", help="numbers of agents decoded together")
    p.add_argument("--batch-context", type=positive_int, default=1024,
                   help="the longest agent's context; agent i of N holds (i+1)/N of it")
    p.add_argument("--batch-tokens", type=positive_int, default=32, help="greedy tokens generated per agent")
    p.add_argument("--batch-format", type=_format, default="q4", help="KV format of the batch section")
    p.add_argument("--sections", type=_sections, default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where memory files are written (default: the system temp dir); put it on the disk "
                        "agents would live on")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and K/V")
    p.add_argument("--json", type=Path, default=None, help="write every figure, the machine and versions here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG with one panel per section here")


def _format(text: str) -> KVFormat:
    try:
        return KVFormat.parse(text)
    except EdgeLLMError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _formats(text: str) -> list[KVFormat]:
    return list(dict.fromkeys(_format(name) for name in text.split(",")))


def _sections(text: str) -> list[str]:
    names = set(text.split(","))
    if unknown := names - set(SECTIONS):
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(sorted(unknown))}; "
                                         f"choose from {','.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]


class Subject(NamedTuple):
    """A model under test, its tokenizer, and how the report names it."""

    model: nn.Module
    tokenizer: Tokenizer
    name: str
    random_weights: bool


def random_twin(model: nn.Module, window: int, seed: int = 0) -> nn.Module:
    """A random-init model of `model`'s architecture whose window reaches `window` positions.

    Prefill, restore and decode cost depend on shapes, not weight values, so the twin times contexts the real model
    was not trained for; its fingerprint differs, so the real model's memory files never restore into it.
    """
    torch.manual_seed(seed)
    twin = type(model)(replace(model.args, max_position_embeddings=window))
    twin.tie_weights()
    twin = twin.to(model.model.embed_tokens.weight.dtype).eval().requires_grad_(False)
    twin.fingerprint = f"random-twin:{model.fingerprint}:{window}"
    return twin


def _load(args: argparse.Namespace, dtype: torch.dtype, workdir: Path) -> tuple[Subject, Subject | None]:
    """The model under test and, when a TTFT context is past its window, its random-init twin."""
    longest = max(args.contexts) + 1 if "ttft" in args.sections else 0  # the prompt and the agent's new token
    if args.random_llama:
        path = Path(build_random_llama(args.random_llama, str(workdir / f"random-llama-{args.random_llama}"),
                                       dtype_name(dtype)))
        config = json.loads((path / "config.json").read_text())
        config["max_position_embeddings"] = max(config["max_position_embeddings"], longest)
        (path / "config.json").write_text(json.dumps(config))
        return Subject(load_model(path, dtype), Tokenizer(path), path.name, True), None
    if args.model:
        path = Path(args.model)
    else:
        from edgellm.assets import default_model_path
        path = default_model_path()
    main = Subject(load_model(path, dtype), Tokenizer(path), path.name, False)
    if longest <= main.model.args.max_position_embeddings:
        return main, None
    return main, Subject(random_twin(main.model, longest), main.tokenizer, f"random {main.name}", True)


def _random_ids(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _random_cache(model: nn.Module, fmt: KVFormat, ids: list[int], seed: int, spare: int = 0) -> PromptCache:
    """A cache holding `ids` whose K/V are random values written straight in (no prefill, no window limit)."""
    args, dtype = model.args, model.model.embed_tokens.weight.dtype
    generator = torch.Generator().manual_seed(seed)
    cache = PromptCache(model, len(ids) + spare, fmt)
    for layer in cache.layers:
        for start in range(0, len(ids), FILL_CHUNK):
            shape = (1, args.num_key_value_heads, min(FILL_CHUNK, len(ids) - start), args.head_dim)
            layer.update_and_fetch(torch.randn(shape, generator=generator).to(dtype),
                                   torch.randn(shape, generator=generator).to(dtype))
    cache.tokens = list(ids)
    return cache


def _held_bytes(cache: PromptCache) -> int:
    """Bytes of the tensors the cache holds for its tokens (what a save writes, header aside)."""
    return sum(t.nbytes for layer in cache.layers for t in layer.state().values())


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


def _warm_up(model: nn.Module, fmt: KVFormat) -> None:
    """One short prefill and decode step per format, so first-call allocations are not timed."""
    cache = PromptCache(model, 65, fmt)
    prefill_tokens(model, list(range(64)), cache)
    prefill_tokens(model, [0], cache)


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
    file_bytes = path.stat().st_size
    path.unlink()
    best = {"cold": min(cold), "ram": min(ram), "disk": min(disk), "restore": min(restore), "raw": min(raw)}
    return {"context": n, "format": str(fmt), "model": subject.name, "random_weights": subject.random_weights,
            "cold_ttft_s": best["cold"], "ram_ttft_s": best["ram"], "disk_ttft_s": best["disk"],
            "restore_s": best["restore"], "raw_read_s": best["raw"],
            "cold_over_disk": best["cold"] / best["disk"], "cold_over_ram": best["cold"] / best["ram"],
            "restore_over_raw_read": best["restore"] / best["raw"],
            "file_bytes": file_bytes, "file_bytes_per_token": file_bytes / n,
            "page_cache": _page_cache_state(resident),
            "resident_after_drop": None if None in resident else max(resident),
            "same_first_token_ram_disk": ram_token == disk_token,
            "reps_s": {"cold": cold, "ram": ram, "disk": disk, "restore": restore, "raw_read": raw}}


def _capacity(subject: Subject, formats: list[KVFormat], tokens: int, budget: int, workdir: Path,
              seed: int) -> dict:
    """Bytes per token (formula, held tensors, saved file) and how many `tokens`-token agents fit in `budget`."""
    model = subject.model
    ids = _random_ids(model.args.vocab_size, tokens, seed)
    fp16_agents = budget // int(KVFormat("fp16").bytes_per_token(model.args) * tokens)
    rows = []
    for fmt in formats:
        cache = _random_cache(model, fmt, ids, seed)
        held = _held_bytes(cache)
        path = save_memory(workdir / f"capacity-{fmt}.safetensors", cache, model, subject.tokenizer.fingerprint)
        file_bytes = path.stat().st_size
        path.unlink()
        agents = budget // held
        rows.append({"format": str(fmt), "bytes_per_token": fmt.bytes_per_token(model.args),
                     "held_bytes_per_token": held / tokens, "file_bytes_per_token": file_bytes / tokens,
                     "agent_bytes": held, "agents": agents,
                     "agents_vs_fp16": agents / fp16_agents if fp16_agents else None})
    return {"model": subject.name, "agent_tokens": tokens, "budget_bytes": budget, "fp16_agents": fp16_agents,
            "rows": rows}


def heldout_ids(tokenizer: Tokenizer, tokens: int) -> list[int]:
    """The first `tokens` ids of the held-out stdlib files, packed as training packs them (BOS … EOS per file).

    EOS is the tokenizer's lowest EOS id, the end-of-text token in the common vocabularies.
    """
    from edgellm.train.corpus import load_corpus, token_stream

    corpus = load_corpus()
    stream = token_stream(corpus.read(corpus.heldout), lambda texts: [tokenizer.encode(t) for t in texts],
                          min(tokenizer.eos_token_ids, default=0))
    return stream[:tokens].tolist()


@torch.no_grad()
def _quality(subject: Subject, formats: list[KVFormat], tokens: int) -> dict:
    """Perplexity, KL divergence and top-1 agreement of each format vs a dense cache in the model's dtype.

    Text is fed QUALITY_CHUNK tokens at a time, in segments of up to the model's window, every cache in lockstep,
    so each chunk attends to the past exactly as that format holds it.
    """
    model = subject.model
    ids = heldout_ids(subject.tokenizer, tokens)
    span = min(len(ids), model.args.max_position_embeddings)
    names = {"reference": None, **{str(f): f for f in formats}}
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0} for name in names}
    scored = 0
    for s0 in range(0, len(ids), span):
        segment = ids[s0:s0 + span]
        caches = {name: PromptCache(model, len(segment), fmt) for name, fmt in names.items()}
        for c0 in range(0, len(segment) - 1, QUALITY_CHUNK):
            x = torch.tensor([segment[c0:c0 + QUALITY_CHUNK]])
            target = torch.tensor(segment[c0 + 1:c0 + QUALITY_CHUNK + 1]).unsqueeze(1)
            ref = None
            for name, cache in caches.items():
                logp = model(x, cache.layers)[0, :len(target)].float().log_softmax(-1)
                ref = logp if ref is None else ref
                sums[name]["nll"] -= logp.gather(1, target).sum().item()
                sums[name]["kl"] += (ref.exp() * (ref - logp)).sum().item()
                sums[name]["agree"] += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
            scored += len(target)
    ref_ppl = math.exp(sums["reference"]["nll"] / scored)
    rows = []
    for name in names:
        ppl = math.exp(sums[name]["nll"] / scored)
        rows.append({"format": name, "perplexity": ppl, "ppl_delta_pct": 100 * (ppl / ref_ppl - 1),
                     "mean_kl": sums[name]["kl"] / scored, "top1_agreement_pct": 100 * sums[name]["agree"] / scored})
    return {"model": subject.name, "reference": f"dense {dtype_name(model.model.embed_tokens.weight.dtype)}",
            "tokens": len(ids), "scored_tokens": scored, "segment_tokens": span, "chunk_tokens": QUALITY_CHUNK,
            "text": "held-out stdlib files (edgellm.train.corpus)", "rows": rows}


@torch.no_grad()
def _memory(subject: Subject, formats: list[KVFormat], tokens: int, seed: int) -> dict:
    """Peak tensor memory allocated by one decode step over `tokens` cached tokens, next to the cache's size."""
    model = subject.model
    ids = _random_ids(model.args.vocab_size, tokens, seed)
    step = torch.tensor([[ids[-1]]])
    rows = []
    for fmt in formats:
        cache = _random_cache(model, fmt, ids, seed, spare=1)
        peak = measure_peak_bytes(lambda cache=cache: model(step, cache.layers, last_only=True))
        held = _held_bytes(cache)
        rows.append({"format": str(fmt), "cache_bytes": held, "decode_peak_bytes": peak,
                     "peak_over_cache": peak / held})
    return {"model": subject.name, "context": tokens, "rows": rows}


def _batch(subject: Subject, fmt: KVFormat, sizes: list[int], longest: int, steps: int, seed: int) -> dict:
    """Aggregate greedy decode tok/s of N live agents with different contexts: one batch vs one after another."""
    model, tokenizer = subject.model, subject.tokenizer
    most = max(sizes)
    prompts = [_random_ids(model.args.vocab_size, max(2, longest * (i + 1) // most), seed + 1 + i)
               for i in range(most)]
    generate(model, tokenizer, prompts[0][:64], 4, prompt_cache=PromptCache(model, 68, fmt))  # warm-up
    rows = []
    for n in sorted(set(sizes)):
        agents = prompts[:n]
        caches = [PromptCache(model, len(p) + steps, fmt) for p in agents]
        for p, cache in zip(agents, caches, strict=True):
            prefill_tokens(model, p[:-1], cache)  # live agents: only each one's newest token is left to prefill
        copies = copy.deepcopy(caches)
        t0 = time.perf_counter()
        batched = batch_generate(model, tokenizer, agents, steps, prompt_caches=caches)
        t1 = time.perf_counter()
        alone = [generate(model, tokenizer, p, steps, prompt_cache=c) for p, c in zip(agents, copies, strict=True)]
        t2 = time.perf_counter()
        tokens = sum(len(r.tokens) for r in batched)
        rows.append({"agents": n, "contexts": [len(p) for p in agents], "tokens": tokens,
                     "batched_s": t1 - t0, "sequential_s": t2 - t1, "batched_tok_s": tokens / (t1 - t0),
                     "sequential_tok_s": sum(len(r.tokens) for r in alone) / (t2 - t1),
                     "speedup": (t2 - t1) / (t1 - t0),
                     "outputs_equal": [r.tokens for r in batched] == [r.tokens for r in alone]})
    return {"model": subject.name, "format": str(fmt), "tokens_per_agent": steps, "rows": rows}


def _target(what: str, value: float | None, op: str, limit: float) -> dict:
    met = value is not None and (value >= limit if op == "≥" else value <= limit)
    return {"what": what, "value": value, "target": f"{op} {limit:g}", "met": met}


def _targets(report: dict[str, Any]) -> list[dict]:
    """The mission's pillar-2 targets this run measured, worst (or best-scheme) case each."""
    out = []
    if ttft := report.get("ttft"):
        at = 4096 if any(r["context"] == 4096 for r in ttft) else max(r["context"] for r in ttft)
        worst = min((r for r in ttft if r["context"] == at), key=lambda r: r["cold_over_disk"])
        out.append(_target(f"cold prefill / restore from disk, {at} tokens (worst: {worst['format']})",
                           worst["cold_over_disk"], "≥", 100))
        slowest = max(ttft, key=lambda r: r["restore_over_raw_read"])
        out.append(_target(f"restore / raw read of the file (worst: {slowest['format']} at {slowest['context']})",
                           slowest["restore_over_raw_read"], "≤", 2))
    if capacity := report.get("capacity"):
        q4 = [r["agents_vs_fp16"] for r in capacity["rows"] if KVFormat.parse(r["format"]).kind == "q4"]
        if q4:
            out.append(_target(f"agents in {capacity['budget_bytes'] / GIB:g} GiB, Q4 vs fp16 (best scheme)",
                               max(q4, key=lambda v: v or 0), "≥", 3.5))
    if quality := report.get("quality"):
        for kind, limit in PPL_TARGETS.items():
            deltas = [r["ppl_delta_pct"] for r in quality["rows"][1:] if KVFormat.parse(r["format"]).kind == kind]
            if deltas:
                out.append(_target(f"{kind.upper()} KV perplexity vs dense, % (best scheme)", min(deltas), "≤", limit))
    return out


def _checks(report: dict[str, Any]) -> dict[str, bool]:
    """Sanity checks that must hold whatever the machine: a failure is a bug, not a slow result."""
    checks = {}
    if "ttft" in report:
        checks["restored_cache_gives_the_same_first_token"] = all(r["same_first_token_ram_disk"]
                                                                  for r in report["ttft"])
    if "batch" in report:
        checks["batched_greedy_equals_sequential"] = all(r["outputs_equal"] for r in report["batch"]["rows"])
    return checks


def _model_json(subject: Subject) -> dict:
    args = subject.model.args
    return {"name": subject.name, "path": None if subject.random_weights else str(subject.model.path),
            "random_weights": subject.random_weights, "window": args.max_position_embeddings,
            "dtype": dtype_name(subject.model.model.embed_tokens.weight.dtype),
            "layers": args.num_hidden_layers, "kv_heads": args.num_key_value_heads, "head_dim": args.head_dim,
            "parameters": sum(p.numel() for p in subject.model.parameters())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen sections, print a table each, write --json/--plot; returns the report."""
    if args.budget_gib <= 0:
        raise InvalidRequestError(f"--budget-gib must be positive, got {args.budget_gib}")
    dtype = resolve_dtype(args.dtype)
    hw = measure_hardware()  # before any model is in memory
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-kv-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        main, twin = _load(args, dtype, workdir)
        window = main.model.args.max_position_embeddings
        if "batch" in args.sections and args.batch_context + args.batch_tokens > window:
            raise InvalidRequestError(f"--batch-context {args.batch_context} + --batch-tokens {args.batch_tokens} "
                                      f"exceed {main.name}'s window of {window}")
        report: dict[str, Any] = {
            "benchmark": "kv",
            "settings": {"model": None if args.random_llama else str(main.model.path),
                         "random_llama": args.random_llama, "dtype": dtype_name(dtype),
                         "formats": [str(f) for f in args.formats],
                         "contexts": sorted(set(args.contexts)), "reps": args.reps, "budget_gib": args.budget_gib,
                         "agent_context": args.agent_context, "quality_tokens": args.quality_tokens,
                         "memory_context": args.memory_context, "batch": sorted(set(args.batch)),
                         "batch_context": args.batch_context, "batch_tokens": args.batch_tokens,
                         "batch_format": str(args.batch_format), "sections": args.sections, "seed": args.seed,
                         "workdir": str(workdir.parent), "threads": torch.get_num_threads()},
            "models": {"main": _model_json(main), **({"twin": _model_json(twin)} if twin else {})},
            "hardware": hw.to_json()}
        for section in args.sections:
            if section == "quality" and main.random_weights:
                continue
            print(f"[bench kv] {section} …", file=sys.stderr)
            if section == "ttft":
                report["ttft"] = _run_ttft(args, main, twin, workdir)
            elif section == "capacity":
                report["capacity"] = _capacity(main, args.formats, args.agent_context,
                                               int(args.budget_gib * GIB), workdir, args.seed)
            elif section == "quality":
                report["quality"] = _quality(main, args.formats, args.quality_tokens)
            elif section == "memory":
                report["memory"] = _memory(main, args.formats, args.memory_context, args.seed)
            elif section == "batch":
                report["batch"] = _batch(main, args.batch_format, args.batch, args.batch_context,
                                         args.batch_tokens, args.seed)
    report["targets"] = _targets(report)
    report["checks"] = _checks(report)
    report["versions"] = {"edgellm": edgellm.__version__, "torch": torch.__version__,
                          "python": platform.python_version(), "platform": platform.platform()}
    report["notes"] = _notes(args, main, twin)
    print_tables(report)
    write_report(report, args.json, args.plot, plot)
    if failed := [name for name, ok in report["checks"].items() if not ok]:
        raise EdgeLLMError(f"bench kv sanity check failed: {', '.join(failed)} (figures written all the same)")
    return report


def _run_ttft(args: argparse.Namespace, main: Subject, twin: Subject | None, workdir: Path) -> list[dict]:
    """Every (context, format) row, on the real model where the prompt fits its window, else on the twin."""
    ids = _random_ids(main.model.args.vocab_size, max(args.contexts) + 1, args.seed)
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


def _notes(args: argparse.Namespace, main: Subject, twin: Subject | None) -> list[str]:
    notes = [
        "ttft: cold = fresh cache + prefill of the whole prompt + argmax; ram = the agent's live cache, prompt + 1 "
        "new token, only the new token prefilled; disk = restore_memory (fingerprints, KV format and CRC32 of every "
        "tensor checked) + prefill of the new token; restore_s = restore_memory alone; raw_read_s = reading the "
        f"file's bytes; best of --reps, cold prefill once past {LONG_PROMPT} tokens; prompts are seeded random ids",
        "page cache: before every raw read and restore the file is fsynced and posix_fadvise(DONTNEED)-ed; 'cold' "
        "means mincore found none of its pages resident afterwards (a VM's host may still cache the disk)",
        "capacity: held = bytes of the tensors a cache holds at --agent-context tokens (a kivi cache's "
        "full-precision window included, in the model's dtype); agents = floor(budget / held); fp16 agents from "
        "the dense fp16 formula; caches filled with random K/V (sizes do not depend on values)",
        "quality: held-out stdlib text fed in chunks through each cache; reference = a dense cache in the model's "
        "dtype; mean KL = KL(reference ‖ format) of the next-token distribution, averaged over scored tokens; top-1 "
        "= share of positions whose argmax matches the reference's",
        "memory: peak = most tensor memory allocated at once during one decode step of the whole model "
        "(torch.profiler allocator events), the cache itself excluded; caches filled with random K/V, so positions "
        "past the model's window cost the same bytes they would on a model trained for them",
        "batch: agents' caches hold their prompt but its last token; batched = one batch_generate call, sequential "
        "= generate per agent on a copy of the same caches; tok/s counts every generated token",
    ]
    if twin:
        notes.append(f"TTFT rows past {main.name}'s window of {main.model.args.max_position_embeddings} positions run "
                     f"on '{twin.name}': same architecture and dtype, random weights (timings depend on shapes only)")
    if main.random_weights and "quality" in args.sections:
        notes.append("quality skipped: random weights have no meaningful perplexity")
    return notes


def print_tables(report: dict[str, Any]) -> None:
    """One table per section that ran, then the targets."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size().columns, 180))  # the TTFT table is wide; never squash it
    hw, main = report["hardware"], report["models"]["main"]
    console.print(f"[bold]{main['name']}[/]: {main['parameters'] / 1e6:.1f}M parameters, {main['dtype']}, window "
                  f"{main['window']}; {hw['cpu']}, {hw['threads']} threads")

    def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
        t = Table(title=title, title_justify="left")
        for i, name in enumerate(columns):
            t.add_column(name, justify="left" if i < 2 and name in ("format", "model", "what") else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)

    if ttft := report.get("ttft"):
        table("TTFT of a returning agent (one new token)",
              ["tokens", "format", "model", "cold ms", "RAM ms", "disk ms", "restore ms", "raw read ms", "cold/disk",
               "cold/RAM", "restore/read", "file MiB", "page cache"],
              [[str(r["context"]), r["format"], r["model"], *(f"{r[k] * 1000:.1f}" for k in (
                  "cold_ttft_s", "ram_ttft_s", "disk_ttft_s", "restore_s", "raw_read_s")),
                f"{r['cold_over_disk']:.0f}×", f"{r['cold_over_ram']:.0f}×", f"{r['restore_over_raw_read']:.2f}×",
                f"{r['file_bytes'] / MIB:.2f}", r["page_cache"]] for r in ttft])
    if cap := report.get("capacity"):
        table(f"Capacity: agents of {cap['agent_tokens']} tokens in {cap['budget_bytes'] / GIB:g} GiB "
              f"(fp16: {cap['fp16_agents']})",
              ["format", "B/token (formula)", "B/token held", "B/token file", "MiB/agent", "agents", "vs fp16"],
              [[r["format"], f"{r['bytes_per_token']:.1f}", f"{r['held_bytes_per_token']:.1f}",
                f"{r['file_bytes_per_token']:.1f}", f"{r['agent_bytes'] / MIB:.2f}", str(r["agents"]),
                "—" if r["agents_vs_fp16"] is None else f"{r['agents_vs_fp16']:.2f}×"] for r in cap["rows"]])
    if q := report.get("quality"):
        table(f"Quality on {q['scored_tokens']} held-out tokens vs {q['reference']} cache",
              ["format", "perplexity", "Δ ppl %", "mean KL", "top-1 agree %"],
              [[r["format"], f"{r['perplexity']:.3f}", f"{r['ppl_delta_pct']:+.3f}", f"{r['mean_kl']:.2e}",
                f"{r['top1_agreement_pct']:.2f}"] for r in q["rows"]])
    if mem := report.get("memory"):
        table(f"Peak memory of one decode step at {mem['context']} cached tokens",
              ["format", "cache MiB", "decode peak MiB", "peak/cache"],
              [[r["format"], f"{r['cache_bytes'] / MIB:.2f}", f"{r['decode_peak_bytes'] / MIB:.2f}",
                f"{r['peak_over_cache']:.3f}"] for r in mem["rows"]])
    if b := report.get("batch"):
        table(f"Batched greedy decode, {b['format']} caches, {b['tokens_per_agent']} tokens per agent",
              ["agents", "contexts", "batched tok/s", "sequential tok/s", "speed-up", "outputs"],
              [[str(r["agents"]), ",".join(map(str, r["contexts"])), f"{r['batched_tok_s']:.1f}",
                f"{r['sequential_tok_s']:.1f}", f"{r['speedup']:.2f}×", "equal" if r["outputs_equal"] else "DIFFER"]
               for r in b["rows"]])
    if report["targets"]:
        table("Targets", ["what", "value", "target", "met"],
              [[t["what"], "—" if t["value"] is None else f"{t['value']:.3g}", t["target"], "yes" if t["met"] else "no"]
               for t in report["targets"]])


def plot(report: dict[str, Any], out: Path) -> None:
    """One panel per section: TTFT (log), agents per budget, perplexity delta, decode peak memory, batch tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, draw) for key, draw in (("ttft", _plot_ttft), ("capacity", _plot_capacity),
                                            ("quality", _plot_quality), ("memory", _plot_memory),
                                            ("batch", _plot_batch)) if key in report]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (key, draw) in zip(axes.flat, panels, strict=False):
        draw(ax, report[key])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    hw = report["hardware"]
    fig.suptitle(f"edgellm bench kv: {report['models']['main']['name']}, {hw['cpu']}, {hw['threads']} threads",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _plot_ttft(ax, rows: list[dict]) -> None:
    contexts = sorted({r["context"] for r in rows})
    formats = list(dict.fromkeys(r["format"] for r in rows))
    width = 0.8 / len(formats)
    for i, fmt in enumerate(formats):
        mine = {r["context"]: r for r in rows if r["format"] == fmt}
        xs = [j + (i - (len(formats) - 1) / 2) * width for j, c in enumerate(contexts) if c in mine]
        picked = [mine[c] for c in contexts if c in mine]
        cold = ax.bar(xs, [r["cold_ttft_s"] for r in picked], width, alpha=0.3)
        disk = ax.bar(xs, [r["disk_ttft_s"] for r in picked], width * 0.6, color=cold.patches[0].get_facecolor(),
                      alpha=1.0, label=fmt)
        ax.scatter(xs, [r["ram_ttft_s"] for r in picked], marker="_", color="black", zorder=3)
        ax.bar_label(disk, labels=[f"{r['cold_over_disk']:.0f}×" for r in picked], fontsize=6)
    ax.set_yscale("log")
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT s")
    ax.set_title("TTFT: light = cold prefill, solid = restore from disk\n(label: cold/disk), dash = cache in RAM",
                 fontsize=9)
    ax.legend(fontsize=7)


def _bars(ax, rows: list[dict], values: list[float], labels: list[str], title: str, ylabel: str) -> None:
    """One bar per format, each labelled."""
    ax.bar_label(ax.bar([r["format"] for r in rows], values), labels=labels, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7, rotation=30)


def _plot_capacity(ax, capacity: dict) -> None:
    rows = capacity["rows"]
    _bars(ax, rows, [r["agents"] for r in rows],
          ["" if r["agents_vs_fp16"] is None else f"{r['agents_vs_fp16']:.2f}×" for r in rows],
          f"agents of {capacity['agent_tokens']} tokens in {capacity['budget_bytes'] / GIB:g} GiB (label: vs fp16)",
          "agents")


def _plot_quality(ax, quality: dict) -> None:
    rows = quality["rows"][1:]
    _bars(ax, rows, [r["ppl_delta_pct"] for r in rows], [f"KL {r['mean_kl']:.2g}" for r in rows],
          f"quality vs {quality['reference']} cache (label: mean KL)", "perplexity Δ %")
    ax.axhline(0, color="black", linewidth=0.5)


def _plot_memory(ax, memory: dict) -> None:
    rows = memory["rows"]
    _bars(ax, rows, [r["decode_peak_bytes"] / MIB for r in rows], [f"{r['cache_bytes'] / MIB:.0f}" for r in rows],
          f"decode-step peak at {memory['context']} tokens (label: cache MiB)", "MiB")


def _plot_batch(ax, batch: dict) -> None:
    rows = batch["rows"]
    agents = [r["agents"] for r in rows]
    ax.plot(agents, [r["batched_tok_s"] for r in rows], marker="o", label="batched")
    ax.plot(agents, [r["sequential_tok_s"] for r in rows], marker="o", label="one at a time")
    ax.set_xticks(agents)
    ax.set_xlabel("agents")
    ax.set_ylabel("aggregate tok/s")
    ax.set_title(f"greedy decode, {batch['format']} caches", fontsize=9)
    ax.legend(fontsize=7)

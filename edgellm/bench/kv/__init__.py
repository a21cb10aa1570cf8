"""`edgellm bench kv`: per-agent KV memory: returning-agent TTFT, decode speed, agents per budget, quality, peak
memory, batching.

Each section measures one claim of persistent agent memory against its target. TTFT compares three ways to answer
an agent that comes back with one new token: a cold prefill of the whole prompt, its cache still in RAM, and its
cache restored from disk with the file's page cache dropped first (and checked with mincore, so the report says
whether the read really went to the disk). Sizes and attention memory use caches filled with random K/V: bytes do
not depend on the values, and no prefill is paid for them.

This module is the command (arguments, the run, the report's context); each section is a module of its own.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import edgellm
from edgellm.bench.common import add_threads_argument, positive_int, positive_ints, torch_threads, write_report
from edgellm.bench.kv import batch, capacity, decode, memory, quality, ttft
from edgellm.bench.kv.common import GIB, Subject, load_subjects
from edgellm.bench.kv.quality import heldout_ids
from edgellm.bench.kv.report import checks, plot, print_tables, targets
from edgellm.bench.kv.ttft import LONG_PROMPT, drop_page_cache, resident_fraction
from edgellm.bench.speed import RANDOM_LLAMAS
from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.kv.formats import KVFormat
from edgellm.loader import resolve_dtype
from edgellm.perf import measure_hardware
from edgellm.perf.hardware import dtype_name

__all__ = ["add_arguments", "drop_page_cache", "heldout_ids", "resident_fraction", "run"]

SECTIONS = ("ttft", "decode", "capacity", "quality", "memory", "batch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="HF model directory (default: edgellm's built-in model); "
                        "TTFT contexts past its window run on a random-init model of the same shape")
    source.add_argument("--random-llama", choices=sorted(RANDOM_LLAMAS), default=None,
                        help="a random-init Llama of this size, its window raised to the longest context "
                             "(no quality section: random weights)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="model dtype (auto: bf16 where the CPU has it natively, else fp32)")
    add_threads_argument(p)
    p.add_argument("--formats", type=_formats, default="fp16,q8,q4,q2,q4-kivi-h,q2-kivi-h",
                   help="KV formats compared, comma-separated (e.g. q4-kivi-h)")
    p.add_argument("--contexts", type=positive_ints, default="1024,4096", help="TTFT prompt and decode cache tokens")
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


def _model_json(subject: Subject) -> dict:
    args = subject.model.args
    return {"name": subject.name, "path": None if subject.random_weights else str(subject.model.path),
            "random_weights": subject.random_weights, "window": args.max_position_embeddings,
            "dtype": dtype_name(subject.model.dtype),
            "layers": args.num_hidden_layers, "kv_heads": args.num_key_value_heads, "head_dim": args.head_dim,
            "parameters": sum(p.numel() for p in subject.model.parameters())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark at `--threads` (torch's pool is restored afterwards)."""
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen sections, print a table each, write --json/--plot; returns the report."""
    if args.budget_gib <= 0:
        raise InvalidRequestError(f"--budget-gib must be positive, got {args.budget_gib}")
    dtype = resolve_dtype(args.dtype)
    hw = measure_hardware()  # before any model is in memory
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-kv-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        main, twin = load_subjects(args, dtype, workdir)
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
                report["ttft"] = ttft.measure(args, main, twin, workdir)
            elif section == "decode":
                report["decode"] = decode.measure(_by_window(main, twin, args.contexts), args.formats, args.reps,
                                                  args.seed)
            elif section == "capacity":
                report["capacity"] = capacity.measure(main, args.formats, args.agent_context,
                                                      int(args.budget_gib * GIB), workdir, args.seed)
            elif section == "quality":
                report["quality"] = quality.measure(main, args.formats, args.quality_tokens)
            elif section == "memory":
                report["memory"] = memory.measure(main, args.formats, args.memory_context, args.seed)
            elif section == "batch":
                report["batch"] = batch.measure(main, args.batch_format, args.batch, args.batch_context,
                                                args.batch_tokens, args.seed)
    report["targets"] = targets(report)
    report["checks"] = checks(report)
    report["versions"] = {"edgellm": edgellm.__version__, "torch": torch.__version__,
                          "python": platform.python_version(), "platform": platform.platform()}
    report["notes"] = _notes(args, main, twin)
    print_tables(report)
    write_report(report, args.json, args.plot, plot)
    if failed := [name for name, ok in report["checks"].items() if not ok]:
        raise EdgeLLMError(f"bench kv sanity check failed: {', '.join(failed)} (figures written all the same)")
    return report


def _by_window(main: Subject, twin: Subject | None, contexts: list[int]) -> list[tuple[Subject, list[int]]]:
    """Contexts within the real model's window run on it, longer ones on its random twin."""
    window, contexts = main.model.args.max_position_embeddings, sorted(set(contexts))
    pairs = [(main, [n for n in contexts if n < window]), (twin, [n for n in contexts if n >= window])]
    return [(subject, lengths) for subject, lengths in pairs if subject is not None and lengths]


def _notes(args: argparse.Namespace, main: Subject, twin: Subject | None) -> list[str]:
    notes = [
        "ttft: cold = fresh cache + prefill of the whole prompt + argmax; ram = the agent's live cache, prompt + 1 "
        "new token, only the new token prefilled; disk = restore_memory (fingerprints, KV format and CRC32 of every "
        "tensor checked) + prefill of the new token; restore_s = restore_memory alone; raw_read_s = reading the "
        f"file's bytes; best of --reps, cold prefill once past {LONG_PROMPT} tokens; prompts are seeded random ids",
        "page cache: before every raw read and restore the file is fsynced and posix_fadvise(DONTNEED)-ed; 'cold' "
        "means mincore found none of its pages resident afterwards (a VM's host may still cache the disk); the "
        "warm_* figures repeat raw read and restore with the file's pages cached; warm_raw_into_reused_s reads "
        "the file into a buffer already faulted in (read_bytes gets a fresh allocation each time, which malloc "
        "serves from faulted-in heap below its mmap threshold (32 MiB at most) and from fresh pages above it); "
        "warm_pool_restore_s restores into a block pool sized for the agent (the server's path: straight into its "
        "blocks; formats a pool holds only), its blocks given back after each rep; a process remembers the headers "
        "of the memory files it saved or read (the agent store restores what it saved), so warm_pool_restore_"
        "unseen_s repeats it with that memo cleared, as the first restore after a restart",
        "decode: one decode step over caches of random K/V at each context, every layer in turn; attention = "
        "each layer's cache.attend alone (new token stored, then trimmed), step = the whole model's forward; the "
        "formats alternate rep by rep, median of --reps after one warm-up; vs baseline = over the first format",
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

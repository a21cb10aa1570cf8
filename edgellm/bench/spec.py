"""`edgellm bench spec`: speculative decoding's decode tok/s against plain decoding, per mode and task.

Modes: prompt lookup (ngram), a draft model sharing the tokenizer (draft), KV Prediction's aux model as the draft
(kvpred, compared with KV Prediction alone: the same output, the TTFT gain kept). Tasks, from held-out stdlib
files: code completion (a function's first lines after the code before it), an edit (a function, then the same
function renamed: the answer mostly re-quotes the prompt) and chat (the model's chat template asking about a
function). Each pair of runs (reference, speculative) alternates on the same prompt, so a shared machine's drift
hits both; a row reports total tokens over total decode time of each, the ratio, whether greedy outputs were
identical, the acceptance rate and the mean tokens per verify pass.
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import edgellm
from edgellm.bench.common import thread_counts, torch_threads, write_report
from edgellm.generate import generate
from edgellm.kernels.native import cpu_flags
from edgellm.loader import load
from edgellm.perf.hardware import cpu_model_name
from edgellm.speculative import MODES, P_MIN, Speculation, check_draft_model
from edgellm.train.corpus import load_corpus

TASKS = ("code", "edit", "chat")
CONTEXT_CHARS = 1500  # code before the function in a completion prompt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the model (default: edgellm's built-in model)")
    p.add_argument("--draft-model", default=None, help="a draft model sharing the tokenizer (enables mode draft)")
    p.add_argument("--kv-predictor", default=None, help="a KV predictor for the model (enables mode kvpred)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 or auto")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated; those lacking a model are skipped")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--threads", type=thread_counts, default=[1, 2], help="comma-separated thread counts")
    p.add_argument("--examples", type=int, default=3, help="prompts per task")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--k", type=int, default=8, help="longest draft")
    p.add_argument("--fixed", action="store_true", help="always draft k tokens (no adaptive draft length)")
    p.add_argument("--p-min", type=float, default=P_MIN,
                   help="draft and kvpred: stop drafting at a guess the draft gives less than this probability")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG of the speedups")


def functions(count: int) -> list[tuple[str, str]]:
    """(the file's text before it, the function's source): 8-40 line functions from held-out stdlib files."""
    found = []
    for path in sorted(load_corpus().heldout):
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.decorator_list and \
                    8 <= node.end_lineno - node.lineno <= 40:
                start = sum(len(line) for line in lines[:node.lineno - 1])
                found.append((text[:start], "".join(lines[node.lineno - 1:node.end_lineno])))
                break
        if len(found) == count:
            break
    return found


def prompts(task: str, tokenizer, count: int, room: int) -> list[list[int]]:
    """Token ids of `count` prompts for `task`, each cut to its first token and its last `room` - 1 (a small
    model's context window must hold the prompt, the answer and a draft)."""
    out = []
    for before, source in functions(count):
        # prompts end before a newline: byte-level BPE merges it with the next line's indentation
        if task == "code":
            head = "".join(source.splitlines(keepends=True)[:2]).rstrip("\n")
            out.append(tokenizer.encode(before[-CONTEXT_CHARS:] + head))
        elif task == "edit":
            name = source.split("def ", 1)[1].split("(", 1)[0]
            renamed = source.replace(f"def {name}(", f"def {name}_v2(", 1)
            first = renamed.splitlines()[0]
            out.append(tokenizer.encode(f"{source}\n\n# The same function, renamed to {name}_v2:\n{first}"))
        else:
            messages = [{"role": "user", "content": f"What does this function do?\n\n{source}"}]
            out.append(tokenizer.encode_chat(messages) if tokenizer.chat_template else
                       tokenizer.encode(f"Question: what does this function do?\n\n{source}\nAnswer:"))
    return [ids[:1] + ids[1:][-(room - 1):] for ids in out]


def timed(model, tokenizer, ids: list[int], max_tokens: int, **kwargs) -> tuple[list[int], float, dict]:
    """Greedy run ignoring EOS: its tokens, its decode seconds (after the first token), its statistics."""
    result = generate(model, tokenizer, ids, max_tokens, **kwargs)
    seconds = (len(result.tokens) - 1) / result.decode_tok_s if result.decode_tok_s else 0.0
    return result.tokens, seconds, result.stats


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load(args.model, args.dtype)
    tokenizer.eos_token_ids = set()  # every run decodes max_tokens: equal work for both sides of a ratio
    draft = None
    if args.draft_model:
        draft, draft_tokenizer = load(args.draft_model, args.dtype)
        check_draft_model(draft, draft_tokenizer, model, tokenizer)
    predictor = None
    if args.kv_predictor:
        from edgellm.kvpred import load_predictor
        predictor = load_predictor(args.kv_predictor, model, tokenizer.fingerprint)
    available = {"ngram": True, "draft": draft is not None, "kvpred": predictor is not None}
    modes = [m for m in args.modes.split(",") if m and available.get(m)]
    tasks = [t for t in args.tasks.split(",") if t in TASKS]
    rows, load_before = [], os.getloadavg()  # a shared machine's load explains noisy ratios
    for threads in args.threads:
        with torch_threads(threads):
            for task in tasks:
                room = int(model.args.max_position_embeddings) - args.max_tokens - args.k - 1
                ids_list = prompts(task, tokenizer, args.examples, room)
                for mode in modes:
                    rows.append(measure(model, tokenizer, ids_list, mode, threads, task, args, draft, predictor))
                    print(f"[bench spec] {rows[-1]}", file=sys.stderr)
    report = {"benchmark": "spec",
              "settings": {"model": str(args.model or "built-in"), "draft_model": args.draft_model,
                           "kv_predictor": args.kv_predictor, "dtype": args.dtype, "examples": args.examples,
                           "max_tokens": args.max_tokens, "k": args.k, "adaptive": not args.fixed,
                           "p_min": args.p_min},
              "hardware": {"cpu": cpu_model_name(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
                           "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "rows": rows,
              "versions": {"edgellm": edgellm.__version__, "torch": torch.__version__,
                           "python": platform.python_version(), "platform": platform.platform()}}
    print_table(report)
    write_report(report, args.json, args.plot, plot)
    return report


def measure(model, tokenizer, ids_list: list[list[int]], mode: str, threads: int, task: str,
            args: argparse.Namespace, draft, predictor) -> dict[str, Any]:
    """One (threads, task, mode) row: reference and speculative runs alternated on each prompt."""
    reference = {"kv_predictor": predictor} if mode == "kvpred" else {}
    def speculation() -> Speculation:
        return Speculation(mode, args.k, adaptive=not args.fixed, p_min=args.p_min).validate()

    spec = {**reference, "speculate": speculation(), "draft_model": draft}
    totals = {"ref_tokens": 0, "ref_s": 0.0, "spec_tokens": 0, "spec_s": 0.0, "drafted": 0, "accepted": 0,
              "verify_steps": 0}
    identical = True
    # warm-up (native kernels, the draft's first run) on its own Speculation: cold step times would skew what the
    # row's adaptive length starts from
    timed(model, tokenizer, ids_list[0], 8, **{**spec, "speculate": speculation()})
    for ids in ids_list:
        plain, plain_s, _ = timed(model, tokenizer, ids, args.max_tokens, **reference)
        fast, fast_s, stats = timed(model, tokenizer, ids, args.max_tokens, **spec)
        identical &= plain == fast
        totals["ref_tokens"] += len(plain) - 1
        totals["ref_s"] += plain_s
        totals["spec_tokens"] += len(fast) - 1
        totals["spec_s"] += fast_s
        totals["drafted"] += stats.get("drafted_tokens", 0)
        totals["accepted"] += stats.get("accepted_tokens", 0)
        totals["verify_steps"] += stats.get("verify_steps", 0)
    ref_tok_s = totals["ref_tokens"] / totals["ref_s"]
    spec_tok_s = totals["spec_tokens"] / totals["spec_s"]
    return {"threads": threads, "task": task, "mode": mode,
            "reference": "kvpred" if mode == "kvpred" else "plain",
            "reference_tok_s": round(ref_tok_s, 2), "spec_tok_s": round(spec_tok_s, 2),
            "speedup": round(spec_tok_s / ref_tok_s, 3), "identical_greedy_output": identical,
            "acceptance_rate": round(totals["accepted"] / totals["drafted"], 3) if totals["drafted"] else None,
            "tokens_per_verify": round(1 + totals["accepted"] / totals["verify_steps"], 2)
            if totals["verify_steps"] else None,
            "drafted": totals["drafted"], "prompts": len(ids_list), "timestamp": time.time()}


def print_table(report: dict[str, Any]) -> None:
    print(f"{'thr':>3} {'task':<5} {'mode':<7} {'ref tok/s':>9} {'spec tok/s':>10} {'speedup':>7} {'same':>5} "
          f"{'accept':>6} {'tok/pass':>8}")
    for r in report["rows"]:
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        per = "-" if r["tokens_per_verify"] is None else f"{r['tokens_per_verify']:.2f}"
        print(f"{r['threads']:>3} {r['task']:<5} {r['mode']:<7} {r['reference_tok_s']:>9.1f} "
              f"{r['spec_tok_s']:>10.1f} "
              f"{r['speedup']:>6.2f}x {r['identical_greedy_output']!s:>5} {accept:>6} {per:>8}")


def plot(report: dict[str, Any], out: Path) -> None:
    """Speedup over the reference per task and mode, one panel per thread count, with the 1.0 and 0.95 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4), squeeze=False)
    for ax, t in zip(axes[0], threads, strict=True):
        rows = [r for r in report["rows"] if r["threads"] == t]
        labels = [f"{r['task']}\n{r['mode']}" for r in rows]
        ax.bar(range(len(rows)), [r["speedup"] for r in rows], color=[f"C{MODES.index(r['mode'])}" for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.95, color="r", lw=0.8, ls="--")
        ax.set_ylabel("decode tok/s vs reference")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
    fig.suptitle(f"edgellm bench spec: {report['settings']['model']}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)

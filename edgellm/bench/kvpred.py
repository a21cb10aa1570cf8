"""`edgellm bench kvpred`: KV Prediction's TTFT FLOPs, measured TTFT and quality against the base and baselines.

Methods: the base (upper bound), each predictor (aux prefill + K/V maps + one base step, then the base decodes),
each predictor's trained aux used alone, and the base pruned to each predictor's depth without training.
TTFT FLOPs are analytic (edgellm.kvpred.flops); measured TTFT runs random prompts (the model's window does not
limit timing: RoPE positions past it only change values). Quality uses held-out text the predictors did not
train on (the same split as `edgellm kvpred train`): next-token accuracy and perplexity of the true continuation
after each prompt; agreement with the base's greedy tokens (the first token, position by position over the
continuation, and the common prefix length); and exact match of the next line of held-out Python code.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import edgellm
from edgellm import runner
from edgellm.bench.common import (
    add_threads_argument,
    non_negative_int,
    positive_int,
    positive_ints,
    torch_threads,
    write_report,
)
from edgellm.kv.prompt_cache import PromptCache
from edgellm.kvpred.flops import base_ttft_flops, kvpred_ttft_flops
from edgellm.kvpred.predictor import KVPredictor, load_predictor, prune_model
from edgellm.kvpred.train import encode_stream, training_texts
from edgellm.loader import load_model, resolve_dtype
from edgellm.runner import prefill_tokens
from edgellm.sequence import Sequence
from edgellm.tokenizer import Tokenizer
from edgellm.train.trainer import heldout_windows

MAX_LINE_TOKENS = 48  # a generated code line longer than this counts as a miss


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_threads_argument(p)
    p.add_argument("--base", default=None, help="base model directory (default: edgellm's built-in model)")
    p.add_argument("--predictors", default="", help="comma-separated predictor files or `kvpred train` directories")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--lengths", type=positive_ints, default="512,2048,4096", help="prompt tokens for TTFT")
    p.add_argument("--reps", type=positive_int, default=2, help="timed repetitions per length, best kept")
    p.add_argument("--data", default=None, help="held-out data as for `kvpred train --data` (default: the stdlib)")
    p.add_argument("--windows", type=positive_int, default=16, help="held-out prompts scored for quality")
    p.add_argument("--prompt-tokens", type=positive_int, default=256, help="prompt length of the quality prompts")
    p.add_argument("--continuation", type=positive_int, default=32,
                   help="true continuation tokens scored, and greedy tokens compared with the base")
    p.add_argument("--code-examples", type=non_negative_int, default=32,
                   help="next-line completions from held-out code (0: skip the code task)")
    p.add_argument("--code-context", type=positive_int, default=256, help="code tokens before each line")
    p.add_argument("--no-baselines", action="store_true", help="only the base and the predictors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--plot", type=Path, default=None, help="write the quality vs TTFT-FLOPs Pareto plot (PNG) here")


@dataclass
class Method:
    """One way to produce the first token: which model prefills, whether K/V are predicted, who decodes."""

    name: str
    kind: str  # base | kvpred | aux | pruned
    model: nn.Module  # the model that decodes after the first token
    predictor: KVPredictor | None = None

    def start(self, ids: list[int], extra: int) -> tuple[torch.Tensor, PromptCache]:
        """First-token logits after `ids`, and the cache the decoder continues from."""
        cache = PromptCache(self.model, capacity=len(ids) + extra)
        if self.predictor is not None:
            self.predictor.prefill(self.model, ids[:-1], cache)
            return prefill_tokens(self.model, ids[-1:], cache), cache
        return prefill_tokens(self.model, ids, cache), cache

    def ttft_flops(self, prompt: int) -> float:
        if self.kind == "kvpred":
            return kvpred_ttft_flops(self.model.args, self.predictor.aux.args, prompt)
        return base_ttft_flops(self.model.args, prompt)


def _methods(base: nn.Module, predictors: list[KVPredictor], baselines: bool) -> list[Method]:
    methods = [Method("base", "base", base)]
    fractions = []
    for pred in predictors:
        label = pred.path.parent.name if pred.path.name == "kv_predictor.safetensors" else pred.path.stem
        methods.append(Method(f"kvpred:{label}", "kvpred", base, pred))
        if baselines:
            methods.append(Method(f"aux-alone:{label}", "aux", pred.aux))
            aux = json.loads(pred.meta.get("aux", "{}"))
            if aux.get("kind") == "pruned-base" and aux["keep_fraction"] not in fractions:
                fractions.append(aux["keep_fraction"])
    dtype = base.dtype
    for fraction in fractions:
        pruned, _ = prune_model(base, fraction)
        pruned = pruned.to(dtype).eval().requires_grad_(False)
        pruned.fuse()
        methods.append(Method(f"pruned-base:{fraction:g}", "pruned", pruned))
    return methods


@torch.no_grad()
def _ttft(methods: list[Method], lengths: list[int], reps: int, vocab: int, seed: int) -> dict[str, dict[int, float]]:
    ids = np.random.default_rng(seed).integers(10, vocab, max(lengths)).tolist()
    out: dict[str, dict[int, float]] = {m.name: {} for m in methods}
    for n in lengths:
        for m in methods:
            best = math.inf
            for _ in range(reps):
                t0 = time.perf_counter()
                int(m.start(ids[:n], 1)[0].argmax())
                best = min(best, time.perf_counter() - t0)
            out[m.name][n] = round(best, 4)
            print(f"[bench kvpred] TTFT {m.name} @ {n}: {best * 1000:.0f} ms", file=sys.stderr)
    return out


@torch.no_grad()
def _continuation(m: Method, prompt: list[int], target: list[int]) -> tuple[float, int]:
    """Summed NLL and correct argmax count of `target` after `prompt`, the method's decoder teacher-forced."""
    first, cache = m.start(prompt, len(target))
    logits = [first[None]]
    if len(target) > 1:
        logits.append(m.model(torch.tensor([target[:-1]]), cache.layers)[0])
    logits = torch.cat(logits).float()
    labels = torch.tensor(target)
    return F.cross_entropy(logits, labels, reduction="sum").item(), int((logits.argmax(-1) == labels).sum())


@torch.no_grad()
def _greedy(m: Method, prompt: list[int], steps: int, stop_text: Any = None) -> list[int]:
    """Greedy tokens after `prompt` (stopping early once `stop_text(tokens)` says so)."""
    seq = Sequence(m.model, None, prompt, PromptCache(m.model, capacity=len(prompt) + steps), steps,
                   kv_predictor=m.predictor)
    runner.prefill(m.model, [seq])
    while not seq.finished and not (stop_text and stop_text(seq.generated)):
        runner.decode(m.model, [seq])
    return seq.generated


def _code_examples(texts: list[str], tokenizer: Tokenizer, count: int, context: int,
                   seed: int) -> list[tuple[list[int], str]]:
    """(prompt ids, the true next line): the code before a non-trivial line, its last `context` tokens.

    The prompt stops before the newline that ends the previous line: byte-level BPE merges that newline with the
    next line's indentation, so a prompt cut after it would end on a token the model rarely saw there.
    """
    candidates = []
    for t, text in enumerate(texts):
        lines = text.splitlines(keepends=True)
        offset = 0
        for i, line in enumerate(lines):
            if i >= 5 and len(line.strip()) >= 8 and not line.lstrip().startswith("#"):
                candidates.append((t, offset, line.rstrip("\n")))
            offset += len(line)
    if not candidates:
        return []
    picks = np.random.default_rng(seed).choice(len(candidates), min(count, len(candidates)), replace=False)
    examples = []
    for k in sorted(picks):
        t, offset, line = candidates[k]
        ids = tokenizer.encode(texts[t][:offset - 1])
        examples.append((ids[:1] + ids[1:][-(context - 1):], line))  # keep BOS, then the nearest code
    return examples


def _quality(methods: list[Method], windows: torch.Tensor, prompt_tokens: int, code: list[tuple[list[int], str]],
             tokenizer: Tokenizer, continuation: int) -> dict[str, dict]:
    base_greedy = {}
    results = {}
    for m in methods:
        nll, correct, agree, first, prefix, count = 0.0, 0, 0, 0, 0, 0
        for w, window in enumerate(windows.tolist()):
            prompt, target = window[:prompt_tokens], window[prompt_tokens:prompt_tokens + continuation]
            s, c = _continuation(m, prompt, target)
            nll, correct, count = nll + s, correct + c, count + len(target)
            greedy = _greedy(m, prompt, continuation)
            if m.kind == "base":
                base_greedy[w] = greedy
            same = [a == b for a, b in zip(greedy, base_greedy[w], strict=False)]
            agree, first = agree + sum(same), first + same[0]
            prefix += same.index(False) if False in same else len(same)
        exact = 0
        for ids, line in code:  # the completion must be "\n" + the line + "\n"
            tokens = _greedy(m, ids, MAX_LINE_TOKENS, lambda toks: "\n" in tokenizer.decode(toks)[1:])
            text = tokenizer.decode(tokens)
            exact += text.startswith("\n") and text[1:].split("\n")[0].rstrip() == line.rstrip()
        results[m.name] = {"next_token_accuracy": round(correct / count, 4),
                           "perplexity": round(math.exp(nll / count), 3),
                           "first_token_agreement": round(first / len(windows), 4),
                           "greedy_agreement": round(agree / (len(windows) * continuation), 4),
                           "greedy_common_prefix": round(prefix / len(windows), 2),
                           "code_exact_match": round(exact / len(code), 4) if code else None}
        print(f"[bench kvpred] quality {m.name}: {results[m.name]}", file=sys.stderr)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark at `--threads` (torch's pool is restored afterwards)."""
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the base and predictors, measure every method, print the table, write --json/--plot."""
    dtype = resolve_dtype(args.dtype)
    if args.base is None:
        from edgellm.assets import default_model_path
        args.base = str(default_model_path())
    base, tokenizer = load_model(args.base, dtype), Tokenizer(args.base)
    predictors = [load_predictor(p.strip(), base, tokenizer.fingerprint) for p in args.predictors.split(",")
                  if p.strip()]
    methods = _methods(base, predictors, not args.no_baselines)
    _, heldout, corpus = training_texts(args.data)
    windows = heldout_windows(encode_stream(tokenizer, heldout), args.prompt_tokens + args.continuation)
    windows = windows[:args.windows]
    code = _code_examples(heldout, tokenizer, args.code_examples, args.code_context, args.seed)
    lengths = sorted(set(args.lengths))
    print(f"[bench kvpred] {len(methods)} methods, {len(windows)} held-out prompts, {len(code)} code lines",
          file=sys.stderr)
    quality = _quality(methods, windows, args.prompt_tokens, code, tokenizer, args.continuation)
    ttft = _ttft(methods, lengths, args.reps, base.args.vocab_size, args.seed)
    base_flops = {n: base_ttft_flops(base.args, n) for n in lengths}
    rows = []
    for m in methods:
        flops = {n: m.ttft_flops(n) for n in lengths}
        rows.append({"method": m.name, "kind": m.kind,
                     "ttft_gflops": {n: round(f / 1e9, 3) for n, f in flops.items()},
                     "ttft_flops_vs_base": {n: round(f / base_flops[n], 4) for n, f in flops.items()},
                     "ttft_s": ttft[m.name],
                     "ttft_speedup_vs_base": {n: round(ttft["base"][n] / ttft[m.name][n], 3) for n in lengths},
                     **quality[m.name],
                     **({"aux": json.loads(m.predictor.meta.get("aux", "{}")),
                         "training": json.loads(m.predictor.meta.get("training", "{}"))} if m.predictor else {})})
    middle = lengths[len(lengths) // 2]
    report = {"benchmark": "kvpred",
              "settings": {"base": str(args.base), "predictors": [str(p.path) for p in predictors],
                           "dtype": str(dtype).removeprefix("torch."), "lengths": lengths, "reps": args.reps,
                           "windows": len(windows), "prompt_tokens": args.prompt_tokens,
                           "continuation": args.continuation, "code_examples": len(code),
                           "code_context": args.code_context, "corpus": corpus, "seed": args.seed,
                           "threads": torch.get_num_threads()},
              "methods": rows,
              "vs_baselines": vs_baselines(rows, middle),
              "versions": {"edgellm": edgellm.__version__, "torch": torch.__version__,
                           "python": platform.python_version(), "platform": platform.platform()}}
    print_table(report)
    write_report(report, args.json, args.plot, plot)
    return report


def vs_baselines(rows: list[dict[str, Any]], length: int) -> dict[str, Any]:
    """Each predictor against the best baseline (aux alone, pruned base) that spends no more TTFT FLOPs at a
    `length`-token prompt: relative next-token accuracy and code exact match (None where no baseline is that
    cheap), and whether any baseline dominates it (no more FLOPs and at least its accuracy)."""
    baselines = [r for r in rows if r["kind"] in ("aux", "pruned")]
    out: dict[str, Any] = {"length": length, "predictors": {}}
    for r in rows:
        if r["kind"] != "kvpred":
            continue
        flops = r["ttft_gflops"][length]
        cheaper = [b for b in baselines if b["ttft_gflops"][length] <= flops]
        entry: dict[str, Any] = {"dominated_by": [b["method"] for b in cheaper
                                                  if b["next_token_accuracy"] >= r["next_token_accuracy"]]}
        for key in ("next_token_accuracy", "code_exact_match"):
            best = max((b for b in cheaper if b[key] is not None), key=lambda b: b[key], default=None)
            entry[key] = None if best is None else {
                "baseline": best["method"], "baseline_value": best[key],
                "relative_gain": round(r[key] / best[key] - 1, 4) if best[key] else None}
        out["predictors"][r["method"]] = entry
    return out


def print_table(report: dict[str, Any]) -> None:
    lengths = report["settings"]["lengths"]
    head = f"{'method':<28} {'acc':>6} {'ppl':>8} {'first':>6} {'agree':>6} {'prefix':>6} {'code':>6}"
    head += "".join(f" {'GF@' + str(n):>10} {'ms@' + str(n):>9}" for n in lengths)
    print(head)
    for r in report["methods"]:
        code = "-" if r["code_exact_match"] is None else f"{r['code_exact_match']:.3f}"
        line = (f"{r['method']:<28} {r['next_token_accuracy']:>6.3f} {r['perplexity']:>8.2f} "
                f"{r['first_token_agreement']:>6.3f} {r['greedy_agreement']:>6.3f} {r['greedy_common_prefix']:>6.1f} "
                f"{code:>6}")
        line += "".join(f" {r['ttft_gflops'][n]:>10.2f} {r['ttft_s'][n] * 1000:>9.0f}" for n in lengths)
        print(line)
    comparison = report["vs_baselines"]
    for name, entry in comparison["predictors"].items():
        acc = entry["next_token_accuracy"]
        versus = "no baseline is as cheap" if acc is None else (
            f"accuracy {acc['relative_gain']:+.1%} vs {acc['baseline']}" if acc["relative_gain"] is not None
            else f"vs {acc['baseline']} (accuracy 0)")
        dominated = ", dominated by " + ", ".join(entry["dominated_by"]) if entry["dominated_by"] else ""
        print(f"{name} at <= its TTFT FLOPs @ {comparison['length']}: {versus}{dominated}")


def plot(report: dict[str, Any], out: Path) -> None:
    """Pareto plots against TTFT FLOPs at the middle length: next-token accuracy, perplexity, code exact match.

    Reads the report as `run` returns it or as its JSON (whose per-length keys are strings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = report["settings"]["lengths"]
    n = str(lengths[len(lengths) // 2])
    panels = [("next_token_accuracy", "next-token accuracy"), ("perplexity", "perplexity (lower is better)"),
              ("code_exact_match", "next-line exact match (code)")]
    panels = [p for p in panels if any(r[p[0]] is not None for r in report["methods"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    markers = {"base": "*", "kvpred": "o", "aux": "s", "pruned": "^"}
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for r in report["methods"]:
            if r[key] is None:
                continue
            flops = {str(k): v for k, v in r["ttft_gflops"].items()}[n]
            ax.scatter(flops, r[key], marker=markers[r["kind"]], s=60, label=r["method"])
            ax.annotate(r["method"], (flops, r[key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel(f"TTFT GFLOPs at a {n}-token prompt")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    settings = report["settings"]
    fig.suptitle(f"edgellm bench kvpred: {Path(settings['base']).name}, quality after "
                 f"{settings['prompt_tokens']}-token prompts", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)

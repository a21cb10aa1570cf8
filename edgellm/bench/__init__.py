"""`edgellm bench <what>`: benchmarks as code, each printing a table and writing `--json` anyone can rerun.

A benchmark is a module with `add_arguments(parser)` and `run(args)`; adding one is one line in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "speed": ("edgellm.bench.speed", "prefill and decode speed vs transformers, against the machine's roofline"),
    "serve": ("edgellm.bench.replicas", "load-test an OpenAI-compatible server: concurrency sweep, multi-agent TTFT"),
    "quant": ("edgellm.bench.quant", "weight formats: size, speed, % bandwidth, dequant share, quality, vs llama.cpp"),
    "kernels": ("edgellm.bench.kernels", "low-bit GEMV (table lookup, VNNI) vs dequant + matmul; two-pass softmax"),
    "kv": ("edgellm.bench.kv", "per-agent KV memory: restore TTFT, agents per budget, quality, peak memory, batching"),
    "kvpred": ("edgellm.bench.kvpred", "KV Prediction: TTFT FLOPs and time vs quality, against base/aux/pruned"),
    "moe": ("edgellm.bench.moe", "MoE decode/prefill vs llama.cpp on the same GGUF, bandwidth on active bytes"),
    "spec": ("edgellm.bench.spec", "speculative decoding (ngram, draft model, KV-pred aux) vs plain decode tok/s"),
    "structured": ("edgellm.bench.structured", "JSON-schema constrained decoding: tok/s cost and per-token mask time"),
    "lmeval": ("edgellm.bench.lmeval", "lm-evaluation-harness against edgellm serve, every score checked directly"),
    "lora": ("edgellm.bench.lora", "LoRA adapters: batched decode with one adapter per row vs none, load time, bytes"),
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-subcommand per benchmark, each with its own arguments."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        bench = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=bench.__doc__.splitlines()[0])
        bench.add_arguments(p)
        p.set_defaults(bench_run=bench.run)


def run_bench(args: argparse.Namespace) -> None:
    """Run the benchmark chosen on the command line."""
    args.bench_run(args)

"""`edgellm bench moe`: Mixture-of-Experts decode and prefill against llama.cpp on the same GGUF file.

A seeded random-init Qwen3-MoE-shaped model (default ≈1.3B total, ≈0.25B active per token: the shape of
Qwen3-30B-A3B scaled down) is exported once per format (Q8_0 and Q4_0 by edgellm's writer, the k-quants by
llama.cpp's quantizer from the F16 export), and both engines run that very file in fresh processes, alternated
round by round so a noisy neighbour hits both. Decode bandwidth is counted on active bytes: what one token reads
(attention, router, the top-k experts' share of the expert weights, the head) under uniform routing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from edgellm.bench.common import positive_int, thread_counts, torch_threads, write_report
from edgellm.bench.quant import (
    GGUF_FILE_FORMATS,
    MIB,
    _decode_bytes,
    _edgellm_speed,
    _llama_cpp_quantize,
    _llama_cpp_speed,
    _load,
    best_round,
    dram_roofs,
    ensure_llama_cpp,
)
from edgellm.errors import EdgeLLMError
from edgellm.perf import measure_hardware
from edgellm.perf.hardware import physical_cores

RANDOM_MOES = {
    # Qwen3-30B-A3B's proportions (head_dim 128, 4 KV heads, top-8 of many small experts) at hidden 1024
    "qwen3-moe-1.3b": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                           head_dim=128, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512,
                           intermediate_size=2048, norm_topk_prob=True, vocab_size=32768,
                           max_position_embeddings=4096, tie_word_embeddings=False),
    "qwen3-moe-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                           intermediate_size=256, norm_topk_prob=True, vocab_size=8192,
                           max_position_embeddings=512, tie_word_embeddings=False),
}
EXPORTED = ("f16", "q8_0", "q4_0")  # written by edgellm's GGUF export; the rest by llama.cpp's quantizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(RANDOM_MOES), default="qwen3-moe-1.3b",
                   help="the random-init Qwen3-MoE shape to build (default %(default)s)")
    p.add_argument("--formats", default="q8_0,q4_0",
                   help=f"comma-separated GGUF types, from {', '.join(EXPORTED + GGUF_FILE_FORMATS)}")
    p.add_argument("--threads", type=thread_counts, default=sorted({1, physical_cores()}),
                   help="thread counts to measure, e.g. 1,2 (default: %(default)s)")
    p.add_argument("--prompt-len", type=positive_int, default=256, help="prefill length in tokens")
    p.add_argument("--decode-tokens", type=positive_int, default=32)
    p.add_argument("--reps", type=positive_int, default=2, help="timed repetitions per round (best kept)")
    p.add_argument("--rounds", type=positive_int, default=2,
                   help="edgellm / llama.cpp alternations per format and thread count (best kept)")
    p.add_argument("--offload", type=fractions, default=[1.0, 0.5, 0.25, 0.1],
                   help="resident shares of the expert bytes for the offload curve, on the last format (page cache "
                        "dropped before each; empty to skip; default %(default)s)")
    p.add_argument("--routing", default=None, metavar="DIRS",
                   help="instead: compare trained MoE checkpoints (e.g. `edgellm train --preset moe|moge`), "
                        "comma-separated: held-out perplexity, imbalance over 2/4/8 device groups, load entropy")
    p.add_argument("--routing-tokens", type=positive_int, default=8192, help="held-out tokens for --routing")
    p.add_argument("--offload-model", default=None, metavar="DIR",
                   help="instead: the --offload curve on this trained MoE (exported to the last --formats' GGUF), "
                        "prompted with held-out stdlib text so it routes as it learned to")
    p.add_argument("--llama-cpp-wheel", type=Path, default=None,
                   help="install llama-cpp-python from this wheel instead of building it from PyPI")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG: decode and prefill tok/s per format and engine")


def fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = [-1.0]
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--offload takes shares in (0, 1], comma-separated; got {text!r}")
    return values


def build_random_moe(shape: str, out: str) -> str:
    """A seeded random-init Qwen3-MoE in bf16 with the built-in model's tokenizer (llama.cpp needs a real one in
    the GGUF even when ids are fed directly; the export pads the token list to the vocabulary)."""
    from edgellm.assets import default_model_path
    from edgellm.bench.speed import import_transformers
    from edgellm.checkpoint import read_config

    transformers = import_transformers()
    builtin = Path(default_model_path())
    ids = {k: v for k, v in read_config(builtin).items() if k in ("bos_token_id", "eos_token_id")}
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**RANDOM_MOES[shape], **ids)
    with torch.device("meta"):
        model = transformers.Qwen3MoeForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():  # N(0, 0.02) as transformers initialises, without its fp32 copy of a 1B+ model
        for p in model.parameters():
            p.normal_(0.0, config.initializer_range) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin / name, Path(out) / name)
    return out


def active_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads on average: every stored weight (as `_decode_bytes` counts them) but, in each
    MoE layer, only top_k / n_experts of the expert weights (uniform routing)."""
    total = _decode_bytes(model)
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            expert = sum(t.numel() * t.element_size() for e in mlp.experts
                         for t in list(e.parameters()) + list(e.buffers()))
            total -= round(expert * (1 - mlp.top_k / len(mlp.experts)))
    return total


def _edgellm_moe_speed(gguf: str, threads: int, prompt: list[int], steps: int, reps: int) -> dict[str, Any]:
    """Runs in a fresh process: bench quant's measurement on the GGUF, plus the active and total bytes."""
    speed = _edgellm_speed(gguf, None, threads, prompt, steps, reps)
    model = _load(gguf, None)
    speed.pop("bits_per_weight")
    return {**speed, "active_bytes": active_bytes(model)}


def _offload_speed(gguf: str, threads: int, share: float, prompt: list[int], steps: int) -> dict[str, Any]:
    """Runs in a fresh process: decode tok/s with `share` of the expert bytes resident, from a cold page cache
    (the prefill that pins the first hot set is not timed); share 1 is the plain engine, everything resident."""
    import time

    from edgellm import runner
    from edgellm.bench.kv import drop_page_cache
    from edgellm.kv.prompt_cache import PromptCache
    from edgellm.models import offload
    from edgellm.sequence import Sequence

    torch.set_num_threads(threads)
    drop_page_cache(Path(gguf))
    model = _load(gguf, None)
    store = offload.enable(model, f"{100 * share}%") if share < 1 else None
    seq = Sequence(model, None, prompt, PromptCache(model, capacity=len(prompt) + steps + 1), steps + 1)
    runner.prefill(model, [seq])
    t0 = time.perf_counter()
    while not seq.finished:
        runner.decode(model, [seq])
    out: dict[str, Any] = {"share": share, "decode_tok_s": steps / (time.perf_counter() - t0)}
    if store is not None:
        out |= {**store.stats(), "resident_bytes": store.resident_bytes()}
    return out


def _gguf(pool: ProcessPoolExecutor, path: Path, workdir: Path, fmt: str) -> Path:
    from edgellm.quant.gguf_write import export_gguf

    out = workdir / f"{fmt}.gguf"
    if fmt in EXPORTED:
        pool.submit(export_gguf, str(path), str(out), fmt).result()
    else:
        f16 = _gguf(pool, path, workdir, "f16") if not (workdir / "f16.gguf").exists() else workdir / "f16.gguf"
        pool.submit(_llama_cpp_quantize, str(f16), str(out), fmt).result()
    return out


@torch.no_grad()
def routing_report(path: str, ids: list[int], window: int = 256) -> dict[str, Any]:
    """Held-out perplexity of a trained MoE and how its routing loads experts: the imbalance score IS = (max − min
    load) / tokens when the experts are split into d contiguous groups, one per device (Pangu Pro MoE's measure;
    MoGE makes it 0 at d = its group count), and the entropy of the expert load, averaged over layers and windows."""
    import math

    from edgellm import load
    from edgellm.models.moe import imbalance

    model, _ = load(path, "fp32")
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    experts = len(blocks[0].experts)
    found: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: found.append(m.route(a[0].reshape(-1, a[0].shape[-1]))[2]))
             for b in blocks]
    nll = count = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window + 1]])
        logits = model(chunk[:, :-1])[0].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    for h in hooks:
        h.remove()
    imbalance_by = {}
    for d in (2, 4, 8):
        if experts % d == 0:
            imbalance_by[d] = sum(imbalance(index // (experts // d), d) for index in found) / len(found)
    loads = [torch.bincount(index.flatten(), minlength=experts).float() for index in found]
    entropy = sum(-(p * p.clamp_min(1e-12).log2()).sum().item() for p in (x / x.sum() for x in loads)) / len(loads)
    block = blocks[0]
    return {"model": path, "routing": block.routing, "groups": block.groups, "experts": experts,
            "top_k": block.top_k, "perplexity": math.exp(nll / count), "tokens": int(count),
            "imbalance": imbalance_by, "load_entropy_bits": entropy, "max_entropy_bits": math.log2(experts)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, export each format, alternate the engines; print the table, write --json/--plot."""
    if args.routing:
        return run_routing(args)
    if args.offload_model:
        return run_offload_trained(args)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in EXPORTED + GGUF_FILE_FORMATS]
    if bad or not formats:
        raise EdgeLLMError(f"unknown GGUF type {', '.join(bad) or '(none)'}; use some of "
                           f"{', '.join(EXPORTED + GGUF_FILE_FORMATS)}")
    llama_version = ensure_llama_cpp(args.llama_cpp_wheel)
    with torch_threads(max(args.threads)):
        hw = measure_hardware()
    roofs = dram_roofs(args.threads)
    spec = RANDOM_MOES[args.shape]
    prompt = torch.randint(0, spec["vocab_size"], (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
    rows: list[dict[str, Any]] = []
    with pool, tempfile.TemporaryDirectory(prefix="edgellm-bench-moe-") as tmp:
        workdir = Path(tmp)
        print(f"[bench moe] building the random {args.shape} checkpoint", file=sys.stderr)
        path = Path(pool.submit(build_random_moe, args.shape, str(workdir / args.shape)).result())
        for fmt in formats:
            print(f"[bench moe] {fmt}: exporting, then edgellm and llama.cpp on the same file", file=sys.stderr)
            gguf = _gguf(pool, path, workdir, fmt)
            row: dict[str, Any] = {"format": fmt, "file_mib": gguf.stat().st_size / MIB, "edgellm": {},
                                   "llama_cpp": {}, "ratio": {}}
            for threads in args.threads:
                ours, theirs = [], []
                for _ in range(args.rounds):
                    ours.append(pool.submit(_edgellm_moe_speed, str(gguf), threads, prompt, args.decode_tokens,
                                            args.reps).result())
                    theirs.append(pool.submit(_llama_cpp_speed, str(gguf), threads, prompt, args.decode_tokens,
                                              args.reps).result())
                mine, other = best_round(ours), best_round(theirs)
                for speed in (mine, other):
                    speed["decode_pct_bandwidth_active"] = (100 * mine["active_bytes"] * speed["decode_tok_s"]
                                                            / 1e9 / roofs[threads])
                row["edgellm"][threads], row["llama_cpp"][threads] = mine, other
                row["ratio"][threads] = {k: mine[k] / other[k] for k in ("decode_tok_s", "prefill_tok_s")}
            rows.append(row)
        curve = offload_curve(pool, gguf, args.offload, max(args.threads), prompt, args.decode_tokens)
    from edgellm.kernels.native import cpu_flags

    report = {"benchmark": "moe", "model": args.shape, "config": spec,
              "settings": {"formats": formats, "threads": args.threads, "prompt_len": args.prompt_len,
                           "decode_tokens": args.decode_tokens, "reps": args.reps, "rounds": args.rounds,
                           "llama_cpp": llama_version},
              "hardware": {**hw.to_json(), "cpu_flags": cpu_flags(), "dram_read_gbs_by_threads": roofs},
              "rows": rows,
              "offload": {"format": formats[-1], "threads": max(args.threads), "curve": curve},
              "notes": ["both engines run the same GGUF file; ratio = edgellm / llama.cpp",
                        "active_bytes: every stored weight one decode step reads, with each MoE layer's experts "
                        "counted at top_k / n_experts (uniform routing); decode_pct_bandwidth_active = "
                        "active_bytes x tok/s / the DRAM read bandwidth measured at the same thread count "
                        "(dram_read_gbs_by_threads, as bench quant: the faster of an fp32 GEMV and a sum over "
                        "512 MiB)",
                        "offload: decode after a prefill from a cold page cache; share 1 = every expert resident "
                        "(the plain engine); vs_resident = tok/s / that; a random-init model routes about uniformly, "
                        "the worst case for a resident hot set"]}
    print_table(report)
    write_report(report, args.json, args.plot, plot)
    return report


def print_table(report: dict[str, Any]) -> None:
    hw = report["hardware"]
    roofs = hw.get("dram_read_gbs_by_threads") or {"": hw["mem_read_gbs"]}
    dram = ", ".join(f"{t}T {gbs:.1f}" if t != "" else f"{gbs:.1f}" for t, gbs in roofs.items())
    print(f"\nbench moe: {report['model']} on {hw['cpu']} (DRAM read {dram} GB/s)")
    print(f"{'format':8} {'thr':>3} {'MiB':>7} {'active MiB':>10} {'decode tok/s':>22} {'prefill tok/s':>22} "
          f"{'% BW active':>11}")
    for row in report["rows"]:
        for t, mine in row["edgellm"].items():
            other, ratio = row["llama_cpp"][t], row["ratio"][t]
            print(f"{row['format']:8} {t:>3} {row['file_mib']:7.0f} {mine['active_bytes'] / MIB:10.0f} "
                  f"{mine['decode_tok_s']:7.1f} vs {other['decode_tok_s']:6.1f} {ratio['decode_tok_s']:4.2f}x "
                  f"{mine['prefill_tok_s']:7.1f} vs {other['prefill_tok_s']:6.1f} {ratio['prefill_tok_s']:4.2f}x "
                  f"{mine['decode_pct_bandwidth_active']:10.0f}%")
    print_offload(report)


def print_offload(report: dict[str, Any]) -> None:
    curve = report["offload"]["curve"]
    if curve:
        print(f"\nexpert offload ({report['offload']['format']}, {report['offload']['threads']} threads, cold page "
              f"cache): resident share, decode tok/s, vs all resident, hit rate, disk MiB/token")
        for c in curve:
            ratio = f"{c['vs_resident']:.2f}x" if c["vs_resident"] else "-"
            extra = (f"{100 * c['hit_rate']:5.1f}% {c['disk_bytes_per_token'] / MIB:7.2f}" if "hit_rate" in c
                     else "")
            print(f"  {100 * c['share']:5.0f}% {c['decode_tok_s']:8.1f} {ratio:>6} {extra}")


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curve = report["rows"], report["offload"]["curve"]
    threads = list(rows[0]["edgellm"])
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(16 if curve else 11, 4))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_tok_s", "prefill tok/s")):
        labels = [f"{r['format']} {t}T" for r in rows for t in threads]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [r["edgellm"][t][key] for r in rows for t in threads], 0.4, label="edgellm")
        ax.bar([i + 0.2 for i in x], [r["llama_cpp"][t][key] for r in rows for t in threads], 0.4, label="llama.cpp")
        ax.set_xticks(list(x), labels, rotation=30)
        ax.set_title(f"{report['model']}: {title}")
        ax.legend()
    if curve:
        ax = axes[2]
        ax.plot([100 * c["share"] for c in curve], [c["decode_tok_s"] for c in curve], "o-")
        ax.set_xlabel("experts resident (% of expert bytes)")
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"expert offload, {report['offload']['format']}, cold page cache")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def offload_curve(pool: ProcessPoolExecutor, gguf: Path, shares: list[float], threads: int, prompt: list[int],
                  steps: int, rounds: int = 1) -> list[dict[str, Any]]:
    """Decode tok/s per resident share, each run in a fresh process from a cold page cache, the shares alternated
    round by round (best round kept), and each share's speed over the all-resident one."""
    runs: dict[float, list[dict[str, Any]]] = {share: [] for share in shares}
    for _ in range(rounds):
        for share in shares:
            print(f"[bench moe] {100 * share:.0f}% of the experts resident", file=sys.stderr)
            runs[share].append(pool.submit(_offload_speed, str(gguf), threads, share, prompt, steps).result())
    curve = [max(found, key=lambda r: r["decode_tok_s"]) for found in runs.values()]
    full = next((c["decode_tok_s"] for c in curve if c["share"] == 1), None)
    for c in curve:
        c["vs_resident"] = c["decode_tok_s"] / full if full else None
    return curve


def run_offload_trained(args: argparse.Namespace) -> dict[str, Any]:
    """`--offload-model DIR`: the offload curve of a trained MoE on held-out text, where routing is as skewed as
    training made it (a random-init model routes about uniformly)."""
    from edgellm.bench.kv import heldout_ids
    from edgellm.kernels.native import cpu_flags
    from edgellm.perf.hardware import cpu_model_name
    from edgellm.quant.gguf_write import export_gguf
    from edgellm.tokenizer import Tokenizer

    fmt = [f.strip() for f in args.formats.split(",") if f.strip()][-1]
    if fmt not in EXPORTED:
        raise EdgeLLMError(f"--offload-model exports with edgellm's writer: end --formats with one of "
                           f"{', '.join(EXPORTED)}, not {fmt}")
    prompt = heldout_ids(Tokenizer(args.offload_model), args.prompt_len)
    threads = max(args.threads)
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
    with pool, tempfile.TemporaryDirectory(prefix="edgellm-bench-moe-") as tmp:
        gguf = Path(tmp) / f"{fmt}.gguf"
        pool.submit(export_gguf, args.offload_model, str(gguf), fmt).result()
        curve = offload_curve(pool, gguf, args.offload, threads, prompt, args.decode_tokens, args.rounds)
    report = {"benchmark": "moe-offload", "model": args.offload_model, "settings": {
                  "format": fmt, "threads": threads, "prompt_len": args.prompt_len,
                  "decode_tokens": args.decode_tokens, "rounds": args.rounds},
              "hardware": {"cpu": cpu_model_name(), "cpu_flags": cpu_flags()},
              "offload": {"format": fmt, "threads": threads, "curve": curve},
              "notes": ["decode of greedy tokens after a held-out stdlib prompt, from a cold page cache; share 1 = "
                        "every expert resident; vs_resident = tok/s / that; best of --rounds, shares alternated"]}
    print_offload(report)
    write_report(report, args.json)
    return report


def run_routing(args: argparse.Namespace) -> dict[str, Any]:
    """`--routing DIRS`: the top-k vs MoGE table of trained checkpoints."""
    from edgellm.bench.kv import heldout_ids
    from edgellm.tokenizer import Tokenizer

    paths = [path.strip() for path in args.routing.split(",") if path.strip()]
    tokenizers = [Tokenizer(path) for path in paths]
    if len({t.fingerprint for t in tokenizers}) > 1:
        raise EdgeLLMError("--routing compares models on the same held-out tokens: give models sharing one "
                           "tokenizer (train them with --tokenizer)")
    ids = heldout_ids(tokenizers[0], args.routing_tokens + 1)
    rows = [routing_report(path, ids) for path in paths]
    report = {"benchmark": "moe-routing", "rows": rows,
              "notes": ["imbalance[d]: (max - min tokens routed to a group) / tokens, experts split into d contiguous "
                        "groups (one per device), mean over layers and 256-token windows of held-out stdlib text"]}
    print(f"{'model':32} {'routing':8} {'perplexity':>10} {'IS d=2':>7} {'IS d=4':>7} {'IS d=8':>7} {'entropy':>8}")
    for r in rows:
        imb = [f"{r['imbalance'].get(d, float('nan')):7.3f}" for d in (2, 4, 8)]
        print(f"{Path(r['model']).name:32} {r['routing']:8} {r['perplexity']:10.2f} {' '.join(imb)} "
              f"{r['load_entropy_bits']:5.2f}/{r['max_entropy_bits']:.0f}")
    write_report(report, args.json)
    return report

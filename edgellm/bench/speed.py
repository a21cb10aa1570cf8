"""`edgellm bench speed`: cold prefill and greedy decode, edgellm vs transformers, set against the roofline.

Each engine runs in its own fresh process, one after the other: peak RSS is then that engine's alone, the two
never hold a model in memory at once, and neither inherits the other's allocator or thread-pool state.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import platform
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

import edgellm
from edgellm.bench.common import add_threads_argument, positive_int, positive_ints, torch_threads, write_report
from edgellm.checkpoint import read_config
from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.loader import load_model, resolve_dtype
from edgellm.models import family_for
from edgellm.perf import HardwareProfile, measure_hardware
from edgellm.perf.hardware import dtype_name

# ≈246M parameters: a Llama-3-shaped model (GQA 4) big enough that decode streams its weights from DRAM.
RANDOM_LLAMAS = {
    "250m": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=4096,
                         tie_word_embeddings=True),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096,
                        tie_word_embeddings=True),
}
ENGINES = ("edgellm", "transformers")
WARMUP_DECODE = 4
MIB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="HF model directory (default: edgellm's built-in model)")
    source.add_argument("--random-llama", choices=sorted(RANDOM_LLAMAS), default=None,
                        help="benchmark a random-init Llama of this size, built with transformers in a temp dir")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="both engines use this dtype (auto: bf16 where the CPU has it natively, else fp32)")
    p.add_argument("--prompt-lens", type=positive_ints, default=[128, 512, 2048], help="comma-separated")
    p.add_argument("--decode-tokens", type=positive_int, default=64)
    p.add_argument("--reps", type=positive_int, default=3, help="timed repetitions per prompt length (best kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--no-transformers", action="store_true", help="benchmark edgellm alone")
    add_threads_argument(p)
    p.add_argument("--json", type=Path, default=None, help="write every figure, the machine and versions here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here")


@dataclass(frozen=True)
class ModelCost:
    """The work one model does: FLOPs of a cold prefill and bytes read by one decode step."""

    parameters: int  # unique weights, a tied lm_head counted once
    layer_matmul_params: int  # weights of every projection inside the decoder layers
    lm_head_params: int
    decode_weight_params: int  # every weight but the embedding table (one row is gathered); lm_head even if tied
    kv_elems_per_token: int  # K and V over all layers
    attention_width: int  # layers × query heads × head_dim

    @classmethod
    def from_config(cls, config: dict) -> ModelCost:
        """Counted on a meta-device model, so the figures follow the architecture code rather than a formula."""
        family = family_for(config)
        args = family.ModelArgs.from_config(config)
        with torch.device("meta"):
            model = family.Model(args)
        decode_weights = sum(p.numel() for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
        model.tie_weights()
        layers = model.model.layers
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            layer_matmul_params=sum(m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear)),
            lm_head_params=model.lm_head.weight.numel(),
            decode_weight_params=decode_weights,
            kv_elems_per_token=2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim,
            attention_width=args.num_hidden_layers * args.num_attention_heads * args.head_dim,
        )

    def prefill_flops(self, tokens: int) -> int:
        """2·params per token through the layers, lm_head for the last token only (the engine computes no other
        logits), and causal attention: QKᵀ and AV each 2·head_dim FLOPs per attended (query, key) pair."""
        pairs = tokens * (tokens + 1) // 2
        return 2 * self.layer_matmul_params * tokens + 2 * self.lm_head_params + 4 * self.attention_width * pairs

    def decode_bytes(self, context: float, elem_bytes: int) -> float:
        """Bytes one decode step reads with `context` tokens in the KV cache (the new token's included)."""
        return (self.decode_weight_params + self.kv_elems_per_token * context) * elem_bytes

    def mean_decode_bytes(self, prompt_len: int, steps: int, elem_bytes: int) -> float:
        """Average over `steps` decode steps after a `prompt_len` prompt (step i attends prompt_len + i tokens)."""
        return self.decode_bytes(prompt_len + (steps + 1) / 2, elem_bytes)


class Run(NamedTuple):
    prefill_s: float  # prompt in, first token's logits out, argmax taken: the TTFT
    decode_s: float
    tokens: list[int]  # the first token plus one per decode step


def _edgellm_runner(path: str, dtype: torch.dtype):
    from edgellm import runner
    from edgellm.kv.prompt_cache import PromptCache
    from edgellm.sequence import Sequence

    model = load_model(path, dtype)

    @torch.inference_mode()
    def run(ids: list[int], steps: int) -> Run:
        t0 = time.perf_counter()
        cache = PromptCache(model, capacity=len(ids) + steps)  # part of a cold start, as in stream_generate
        seq = Sequence(model, None, ids, cache, steps + 1, started_at=t0)  # greedy, token ids only
        runner.prefill(model, [seq])
        t1 = time.perf_counter()
        while not seq.finished:
            runner.decode(model, [seq])
        return Run(t1 - t0, time.perf_counter() - t1, seq.generated)

    return run


def _transformers_runner(path: str, dtype: torch.dtype):
    transformers = import_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    # transformers 5.x renames `past_key_values` to `cache` (argument and output alike)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def run(ids: list[int], steps: int) -> Run:
        t0 = time.perf_counter()
        # logits_to_keep=1 is what transformers' own generate() passes: no full-prompt logits
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        tokens = [int(token)]
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(token.view(1, 1), use_cache=True, **{cache_name: getattr(out, cache_name)})
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
        return Run(t1 - t0, time.perf_counter() - t1, tokens)

    return run


def import_transformers():
    """transformers is a benchmark/test dependency only; say how to get it rather than fail on import."""
    try:
        import transformers
    except ImportError as e:
        raise EdgeLLMError("this benchmark needs Hugging Face transformers: pip install transformers "
                           "(or pass --no-transformers to benchmark edgellm alone)") from e
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56):
        raise EdgeLLMError(f"transformers {transformers.__version__} is too old for this benchmark: "
                           "pip install 'transformers>=4.56'")
    transformers.logging.set_verbosity_error()  # its warnings and progress bars would interleave with the table
    transformers.logging.disable_progress_bar()
    return transformers


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss, which is in KiB on Linux, where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_engine(engine: str, path: str, dtype: str, prompts: dict[int, list[int]], steps: int,
                   reps: int, threads: int) -> dict[str, Any]:
    """Run in a fresh process: load, warm up once on the shortest prompt, then `reps` timed runs per prompt."""
    torch.set_num_threads(threads)  # a spawned process starts from torch's default, not the parent's setting
    t0 = time.perf_counter()
    run = {"edgellm": _edgellm_runner, "transformers": _transformers_runner}[engine](path, resolve_dtype(dtype))
    load_s = time.perf_counter() - t0
    loaded_rss = _peak_rss_bytes()
    run(prompts[min(prompts)], WARMUP_DECODE)
    runs = {length: [run(ids, steps) for _ in range(reps)] for length, ids in prompts.items()}
    return {"load_s": load_s, "rss_after_load_mib": loaded_rss / MIB, "peak_rss_mib": _peak_rss_bytes() / MIB,
            "runs": runs}


def build_random_llama(size: str, out: str, dtype: str = "fp32") -> str:
    """Save a seeded random-init Llama with transformers, plus a word-level tokenizer (prompts are random ids).

    Saved in the benchmark's dtype, as a real checkpoint would be, so load time and RSS are not a conversion's.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    transformers = import_transformers()
    spec = RANDOM_LLAMAS[size]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**spec, bos_token_id=0, eos_token_id=1)
    transformers.LlamaForCausalLM(config).to(resolve_dtype(dtype)).save_pretrained(out)
    vocab = {f"t{i}": i for i in range(spec["vocab_size"])}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(Path(out) / "tokenizer.json"))
    (Path(out) / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t0", "eos_token": "t1"}))
    return out


def _summarize(runs: list[Run], length: int, steps: int, cost: ModelCost, dtype: torch.dtype,
               hw: HardwareProfile) -> dict[str, Any]:
    """Best-of-reps times turned into tok/s, achieved GFLOP/s and GB/s, and % of the measured roofs."""
    prefill_s = min(r.prefill_s for r in runs)
    decode_s = min(r.decode_s for r in runs)
    gflops = cost.prefill_flops(length) / prefill_s / 1e9
    gbs = cost.mean_decode_bytes(length, steps, dtype.itemsize) * steps / decode_s / 1e9
    out = {"ttft_s": prefill_s, "prefill_tok_s": length / prefill_s, "prefill_gflops": gflops,
           "prefill_pct_peak": 100 * gflops / hw.peak_gflops(dtype),
           "decode_tok_s": steps / decode_s, "decode_gbs": gbs, "decode_pct_bandwidth": 100 * gbs / hw.mem_read_gbs,
           "prefill_s_reps": [r.prefill_s for r in runs], "decode_s_reps": [r.decode_s for r in runs],
           "tokens": runs[0].tokens}
    if dtype == torch.bfloat16 and not hw.native_bf16:
        out["prefill_pct_fp32_peak"] = 100 * gflops / hw.peak_gflops(torch.float32)
    return out


def _versions(engines: list[str]) -> dict[str, str]:
    versions = {"edgellm": edgellm.__version__, "torch": torch.__version__, "python": platform.python_version(),
                "platform": platform.platform()}
    if "transformers" in engines:
        versions["transformers"] = import_transformers().__version__
    return versions


def _model_source(args: argparse.Namespace) -> tuple[Path | None, dict]:
    """The checkpoint directory (None until a --random-llama is built) and its config, known before any work."""
    if args.random_llama:
        return None, {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                      **RANDOM_LLAMAS[args.random_llama]}
    if args.model:
        path = Path(args.model)
    else:
        try:
            from edgellm.assets import default_model_path
        except ImportError as e:
            raise EdgeLLMError("no built-in model in this install; pass --model DIR or --random-llama 250m") from e
        path = Path(default_model_path())
    if path.suffix.lower() == ".gguf" or "quantization_config" in (config := read_config(path)):
        # its roofline counts bytes from the config's dense shapes; bench quant measures what is stored
        raise InvalidRequestError(f"{path} holds quantized weights: profile it with `edgellm bench quant --model "
                                  "FULL_PRECISION_DIR --formats ...`, which measures each format against llama.cpp")
    return path, config


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark, print the table, write --json/--plot; returns the report."""
    dtype = resolve_dtype(args.dtype)
    engines = ["edgellm"] if args.no_transformers else list(ENGINES)
    versions = _versions(engines)  # fails fast when transformers is missing
    path, config = _model_source(args)
    cost = ModelCost.from_config(config)
    context = int(config.get("max_position_embeddings", 2048))
    if max(args.prompt_lens) + args.decode_tokens > context:
        raise InvalidRequestError(f"prompt length {max(args.prompt_lens)} + {args.decode_tokens} decode tokens "
                                  f"exceeds the model's context window of {context}")
    # prefixes of one seeded sequence: a length's prompt does not depend on which other lengths are asked for
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, int(config["vocab_size"]), (max(args.prompt_lens),), generator=generator).tolist()
    prompts = {n: ids[:n] for n in sorted(set(args.prompt_lens))}
    name = f"random-llama-{args.random_llama}" if args.random_llama else path.name
    with torch_threads(args.threads):  # the roofs are measured with the threads the engines get
        hw = measure_hardware()  # while no model and no other process of ours is alive
    # one fresh process per task: per-engine peak RSS, and never two models in memory at once
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
    with pool, tempfile.TemporaryDirectory(prefix="edgellm-bench-") as workdir:
        if args.random_llama:
            out = str(Path(workdir) / name)
            path = Path(pool.submit(build_random_llama, args.random_llama, out, args.dtype).result())
        measured = {}
        for engine in engines:
            print(f"[bench speed] {engine}: {name}, {dtype_name(dtype)}, prompts {list(prompts)}, "
                  f"{args.decode_tokens} decode tokens × {args.reps} reps", file=sys.stderr)
            measured[engine] = pool.submit(measure_engine, engine, str(path), args.dtype,
                                           prompts, args.decode_tokens, args.reps, args.threads).result()
    report = _report(args, name, path, config, cost, dtype, hw, versions, measured)
    print_table(report)
    write_report(report, args.json, args.plot, plot)
    return report


def _report(args: argparse.Namespace, name: str, path: Path, config: dict, cost: ModelCost, dtype: torch.dtype,
            hw: HardwareProfile, versions: dict[str, str], measured: dict[str, dict]) -> dict[str, Any]:
    results = []
    for length in sorted(set(args.prompt_lens)):
        row: dict[str, Any] = {"prompt_len": length, "decode_tokens": args.decode_tokens}
        for engine, m in measured.items():
            row[engine] = _summarize(m["runs"][length], length, args.decode_tokens, cost, dtype, hw)
        if len(measured) == 2:
            ours, theirs = row["edgellm"], row["transformers"]
            row["edgellm_over_transformers"] = {
                "prefill_tok_s": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
                "decode_tok_s": ours["decode_tok_s"] / theirs["decode_tok_s"],
                "greedy_tokens_match": ours["tokens"] == theirs["tokens"]}
        results.append(row)
    notes = ["times are the best of --reps after one warm-up; TTFT includes KV-cache allocation and the first "
             "argmax; decode tok/s counts the steps after the first token",
             "decode bytes/token = every weight but the embedding table (lm_head counted even when tied) + the KV "
             "cache read at that context, averaged over the decode steps; prefill FLOPs = 2·layer params·T + "
             "2·lm_head params (last token only) + 4·head_dim·heads·layers·T(T+1)/2"]
    if dtype == torch.bfloat16 and not hw.native_bf16:
        notes.append("this CPU has no native bf16: prefill_pct_peak is against the measured (emulated) bf16 GEMM "
                     "peak, prefill_pct_fp32_peak against the fp32 GEMM peak")
    engines = {engine: {k: v for k, v in m.items() if k != "runs"} for engine, m in measured.items()}
    if len(measured) == 2:
        engines["edgellm_over_transformers"] = {
            "peak_rss": engines["edgellm"]["peak_rss_mib"] / engines["transformers"]["peak_rss_mib"]}
    return {
        "benchmark": "speed",
        "settings": {"model": None if args.random_llama else str(path), "random_llama": args.random_llama,
                     "dtype": dtype_name(dtype), "prompt_lens": sorted(set(args.prompt_lens)),
                     "decode_tokens": args.decode_tokens, "reps": args.reps, "seed": args.seed,
                     "engines": list(measured), "threads": args.threads},
        "model": {"name": name,
                  "model_type": config.get("model_type"),
                  "decode_weight_bytes": cost.decode_weight_params * dtype.itemsize,
                  "kv_bytes_per_token": cost.kv_elems_per_token * dtype.itemsize, **asdict(cost)},
        "hardware": hw.to_json(),
        "engines": engines,
        "results": results,
        "versions": versions,
        "notes": notes,
    }


def print_table(report: dict[str, Any]) -> None:
    """One row per engine and prompt length, a ratio row under each pair, the roofs in the header."""
    from rich.console import Console
    from rich.table import Table

    hw, model, settings, results = report["hardware"], report["model"], report["settings"], report["results"]
    dtype, engines = settings["dtype"], settings["engines"]
    emulated = "prefill_pct_fp32_peak" in results[0]["edgellm"]
    console = Console(width=max(shutil.get_terminal_size().columns, 150))  # the table is wide; never squash it
    console.print(f"[bold]{model['name']}[/]: {model['parameters'] / 1e6:.1f}M parameters, {dtype}, "
                  f"{model['decode_weight_bytes'] / MIB:.1f} MiB of weights read per decode token")
    gemm = ", ".join(f"{k} {v:.0f}" for k, v in hw["gemm_gflops"].items())
    console.print(f"{hw['cpu']}, {hw['threads']} threads, native bf16: {'yes' if hw['native_bf16'] else 'no'}; "
                  f"measured roofs: DRAM read {hw['mem_read_gbs']:.1f} GB/s, GEMM {gemm} GFLOP/s")
    table = Table(show_lines=False)
    for name in ["prompt", "engine", "TTFT ms", "prefill tok/s", "GFLOP/s", f"% {dtype} peak",
                 *(["% fp32 peak"] if emulated else []), "decode tok/s", "GB/s", "% DRAM BW", "peak RSS MiB",
                 *(["greedy tokens"] if len(engines) == 2 else [])]:
        table.add_column(name, justify="left" if name == "engine" else "right")
    for row in results:
        for engine in engines:
            r = row[engine]
            table.add_row(str(row["prompt_len"]), engine, f"{r['ttft_s'] * 1000:.1f}", f"{r['prefill_tok_s']:.1f}",
                          f"{r['prefill_gflops']:.1f}", f"{r['prefill_pct_peak']:.1f}%",
                          *([f"{r['prefill_pct_fp32_peak']:.1f}%"] if emulated else []),
                          f"{r['decode_tok_s']:.1f}", f"{r['decode_gbs']:.2f}", f"{r['decode_pct_bandwidth']:.1f}%",
                          f"{report['engines'][engine]['peak_rss_mib']:.0f}", *([""] if len(engines) == 2 else []))
        if ratio := row.get("edgellm_over_transformers"):
            rss = report["engines"]["edgellm_over_transformers"]["peak_rss"]
            table.add_row("", "[bold]edgellm/hf[/]", "", f"[bold]{ratio['prefill_tok_s']:.2f}×[/]", "", "",
                          *([""] if emulated else []), f"[bold]{ratio['decode_tok_s']:.2f}×[/]", "", "",
                          f"{rss:.2f}×", "same" if ratio["greedy_tokens_match"] else "differ", end_section=True)
    console.print(table)
    if emulated:
        console.print(f"no native bf16 on this CPU: % {dtype} peak is against the emulated bf16 GEMM; "
                      "% fp32 peak against the fp32 GEMM")


def plot(report: dict[str, Any], out: Path) -> None:
    """Bars per prompt length for prefill and decode tok/s, both engines, each labelled with its % of the roof."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, engines = report["results"], report["settings"]["engines"]
    lengths = [row["prompt_len"] for row in results]
    width = 0.8 / len(engines)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("prefill_tok_s", "prefill_pct_peak", f"cold prefill tok/s (label: % {report['settings']['dtype']} "
               "GEMM peak)"), ("decode_tok_s", "decode_pct_bandwidth", "decode tok/s (label: % DRAM bandwidth)")]
    for ax, (key, pct, title) in zip(axes, panels, strict=True):
        for i, engine in enumerate(engines):
            xs = [j + (i - (len(engines) - 1) / 2) * width for j in range(len(lengths))]
            bars = ax.bar(xs, [row[engine][key] for row in results], width, label=engine)
            ax.bar_label(bars, labels=[f"{row[engine][pct]:.2g}%" for row in results], fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_title(title, fontsize=10)
    axes[0].legend()
    fig.suptitle(f"{report['model']['name']}, {report['settings']['dtype']}, {report['hardware']['cpu']}, "
                 f"{report['hardware']['threads']} threads", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)

"""`edgellm bench quant`: the quantization profiler — size, speed, bandwidth, dequant share and quality per format.

Each weight format of one model is quantized into a temp dir, then measured in a fresh process: file size, bits
per weight, prefill and decode tokens/s (each at every --threads), % of the measured memory bandwidth reached by
decode, the share of a decode step spent dequantizing, and perplexity / KL divergence / top-1 agreement against
the unquantized model on held-out stdlib text. With --vs-llama-cpp the same model goes through llama.cpp
(llama-cpp-python) as GGUF in the same run, so every speed and quality figure gets a side-by-side ratio. With
--op-split one decode step is also timed op kind by op kind (GEMVs, attention, norms, RoPE + KV write, other).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from edgellm.bench.common import env_var, positive_int, rss_bytes, thread_counts, torch_threads, write_report
from edgellm.bench.speed import RANDOM_LLAMAS
from edgellm.errors import EdgeLLMError
from edgellm.kernels.native import cpu_flags
from edgellm.perf import measure_hardware
from edgellm.perf.hardware import measure_read_bandwidth, physical_cores

DEFAULT_FORMATS = "bf16,q8_0,q4_0,int4-g64,int3-g128,int2-g64,ternary,mxfp4"
UNQUANTIZED = ("bf16", "fp32")
# GGUF types made by llama.cpp's own quantizer from the f16 export: both engines then run the very same file
GGUF_FILE_FORMATS = ("q4_k_m", "q6_k", "q5_k_m", "q3_k_m", "q2_k")
# edgellm format -> the llama.cpp type it is compared with (same bits; Q2_K is llama.cpp's 2-bit workhorse)
LLAMA_CPP_PAIRS = {"bf16": "f16", "q8_0": "q8_0", "q4_0": "q4_0", "int2-g64": "q2_k",
                   **{f: f for f in GGUF_FILE_FORMATS}}
# Safe for CPUs without AMX or AVX512-BF16: a native build of llama.cpp dies in its AMX path on some of them.
LLAMA_CPP_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                        "-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16={bf16} "
                        "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
MIB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="HF model directory (default: edgellm's built-in model)")
    source.add_argument("--random-llama", choices=sorted(RANDOM_LLAMAS), default=None,
                        help="a random-init Llama of this size (speed only: its perplexity means nothing)")
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"comma-separated (default {DEFAULT_FORMATS}); {', '.join(GGUF_FILE_FORMATS)} are GGUF files "
                        "quantized by llama.cpp that both engines load (needs --vs-llama-cpp)")
    p.add_argument("--threads", type=thread_counts, default=sorted({1, physical_cores()}),
                   help="thread counts to measure, e.g. 1,2 (default: %(default)s, 1 and one per physical core)")
    p.add_argument("--prompt-len", type=positive_int, default=256, help="prefill length in tokens")
    p.add_argument("--decode-tokens", type=positive_int, default=32)
    p.add_argument("--reps", type=positive_int, default=2, help="timed repetitions per round (best kept)")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="edgellm / llama.cpp alternations per format and thread count, each in a fresh process (best "
                        "kept): on a shared host a slow minute then slows both engines, not one side of a ratio")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored for quality (0: skip)")
    p.add_argument("--ppl-window", type=positive_int, default=512, help="tokens per scored window")
    p.add_argument("--op-split", action="store_true",
                   help="also time one decode step per kind of op (GEMVs, attention, norms, RoPE + KV write, other)")
    p.add_argument("--vs-llama-cpp", action="store_true",
                   help="also run the same model as GGUF through llama.cpp (llama-cpp-python, installed on demand)")
    p.add_argument("--llama-cpp-wheel", type=Path, default=None,
                   help="install llama-cpp-python from this wheel instead of building it from PyPI")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG: speed vs bits and quality vs bits")


# ---------------------------------------------------------------------------------------------- measurements


def _timed(fn, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _prefill_decode_seconds(prefill_once, decode, reps: int) -> tuple[float, float]:
    """Best-of-`reps` prefill and decode times; one untimed warm-up first (kernels built, allocator primed)."""
    prefill_once()
    decode()
    prefill_s = decode_s = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        prefill_once()
        t1 = time.perf_counter()
        decode()
        prefill_s, decode_s = min(prefill_s, t1 - t0), min(decode_s, time.perf_counter() - t1)
    return prefill_s, decode_s


def _decode_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every parameter and buffer once, but none of the token table (one row is
    gathered) unless the head is tied to it and reads all of it."""
    def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
        return [t for t in list(module.parameters()) + list(module.buffers()) if t.device.type != "meta"]

    embed = {t.data_ptr() for t in tensors(model.model.embed_tokens)}
    seen = set() if embed & {t.data_ptr() for t in tensors(model.lm_head)} else embed
    total = 0
    for t in tensors(model):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _bits_per_weight(model: torch.nn.Module) -> float:
    """Stored bits per weight of the decoder layers' projections (what a format quantizes), scales included."""
    stored = weights = 0
    for name, module in model.model.layers.named_modules():
        if name.endswith("_proj"):
            stored += sum(t.numel() * t.element_size() for n, t in module.state_dict().items() if n != "bias")
            weights += module.in_features * module.out_features
    return 8 * stored / weights


def _dequant_seconds(model: torch.nn.Module, reps: int) -> float:
    """Time to dequantize the projections that decode runs through dequant + GEMM (0 when kernels read the packed
    weights directly): what one decode step pays for dequantization."""
    from edgellm.quant.linear import QuantizedLinear
    from edgellm.quant.qmatmul import kernel_for

    slow = [m.quantized for m in model.modules()
            if isinstance(m, QuantizedLinear) and kernel_for(m.quantized, 1, m.lut) == "dequant"]
    return _timed(lambda: [qt.dequantize(torch.float32) for qt in slow], reps) if slow else 0.0


def _load(path: str, dtype: str | None) -> torch.nn.Module:
    """A checkpoint directory or a GGUF file, as the CLI loads it."""
    from edgellm.loader import load

    return load(path, dtype)[0]


def _edgellm_speed(path: str, dtype: str | None, threads: int, prompt: list[int], steps: int,
                   reps: int, op_split: bool = False) -> dict[str, Any]:
    """Runs in a fresh process: TTFT, decode tok/s and dequant time of one checkpoint at `threads`, and with
    `op_split` the time of one decode step per kind of op."""
    from edgellm import runner
    from edgellm.kv.prompt_cache import PromptCache
    from edgellm.sequence import Sequence

    torch.set_num_threads(threads)
    base = rss_bytes()
    model = _load(path, dtype)
    state = {}

    def prefill_once() -> None:
        cache = PromptCache(model, capacity=len(prompt) + steps + 1)
        state["seq"] = Sequence(model, None, prompt, cache, steps + 1)  # greedy, token ids only
        runner.prefill(model, [state["seq"]])

    def decode() -> None:
        while not state["seq"].finished:
            runner.decode(model, [state["seq"]])

    prefill_s, decode_s = _prefill_decode_seconds(prefill_once, decode, reps)
    rss = rss_bytes() - base
    with env_var("EDGELLM_FUSED_STEP", "0"):  # the same decode op at a time: what the fused native step gains
        op_decode_s = _prefill_decode_seconds(prefill_once, decode, reps)[1]
    with torch.inference_mode():
        dequant_s = _dequant_seconds(model, reps)
    speed = {"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": steps / decode_s,
             "decode_tok_s_op_at_a_time": steps / op_decode_s, "rss_mib": rss / MIB,
             "decode_bytes": _decode_bytes(model), "bits_per_weight": _bits_per_weight(model),
             "dequant_share_pct": min(100.0, 100 * dequant_s * steps / decode_s)}
    if op_split:
        from edgellm.bench.opsplit import measure_op_split

        speed["op_split"] = {**measure_op_split(model, prompt, steps), "untimed_step_ms": 1000 * decode_s / steps}
    return speed


def _score(log_probs, windows: list[list[int]], reference: str) -> dict[str, float]:
    """Perplexity, mean KL(reference ‖ this) and top-1 agreement over the held-out windows, given an engine's
    next-token log-probs for each window's inputs (`log_probs(ids) -> [len(ids), vocab]`)."""
    ref = torch.load(reference)
    nll = kl = agree = count = 0.0
    for i, window in enumerate(windows):
        logp, ref_logp = log_probs(window[:-1]), ref[i].float()
        target = torch.tensor(window[1:]).unsqueeze(1)
        nll -= logp.gather(1, target).sum().item()
        kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        count += len(window) - 1
    return {"perplexity": math.exp(nll / count), "mean_kl": kl / count, "top1_agreement_pct": 100 * agree / count}


@torch.inference_mode()
def _edgellm_quality(path: str, dtype: str | None, windows: list[list[int]], reference: str) -> dict[str, float]:
    model = _load(path, dtype)
    return _score(lambda ids: model(torch.tensor([ids]))[0].float().log_softmax(-1), windows, reference)


@torch.inference_mode()
def _reference_logprobs(path: str, dtype: str | None, windows: list[list[int]], out: str) -> None:
    from edgellm.loader import load_model

    model = load_model(path, dtype)
    torch.save([model(torch.tensor([w[:-1]]))[0].float().log_softmax(-1).to(torch.bfloat16) for w in windows], out)


def _llama_cpp_speed(gguf: str, threads: int, prompt: list[int], steps: int, reps: int) -> dict[str, Any]:
    """The same measurement through llama.cpp: fresh context per rep, greedy, ids fed directly (no BOS added)."""
    import llama_cpp
    import numpy as np

    base = rss_bytes()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=len(prompt) + steps + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    vocab = llm.n_vocab()
    state = {}

    def next_token() -> int:  # only the last position's logits exist without logits_all
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def prefill_once() -> None:
        llm.reset()
        llm.eval(prompt)
        state["token"] = next_token()

    def decode() -> None:
        token = state["token"]
        for _ in range(steps):
            llm.eval([token])
            token = next_token()

    prefill_s, decode_s = _prefill_decode_seconds(prefill_once, decode, reps)
    return {"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": steps / decode_s,
            "rss_mib": (rss_bytes() - base) / MIB}


def _llama_cpp_quality(gguf: str, windows: list[list[int]], reference: str) -> dict[str, float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=max(map(len, windows)) + 8, n_batch=512, logits_all=True, verbose=False)

    def log_probs(ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:len(ids)])).float().log_softmax(-1)

    return _score(log_probs, windows, reference)


def _llama_cpp_quantize(src: str, dst: str, type_name: str) -> None:
    """llama.cpp's own quantizer, for the types edgellm does not write itself (e.g. Q2_K)."""
    import ctypes

    import llama_cpp

    quiet = os.open(os.devnull, os.O_WRONLY)  # its per-tensor log goes to C stdio; this process is a throwaway worker
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise EdgeLLMError(f"llama.cpp failed to quantize {src} to {type_name}")


# ---------------------------------------------------------------------------------------------- llama.cpp setup


def ensure_llama_cpp(wheel: Path | None) -> str:
    """Import llama-cpp-python, installing it first if needed (benchmark-only; ~10 min to build on 2 cores);
    returns its version and the CPU features its build uses (llama.cpp's own system-info line)."""
    try:
        return _llama_cpp_build()
    except ImportError:
        pass
    flags = cpu_flags().split()
    env = dict(os.environ, CMAKE_ARGS=LLAMA_CPP_CMAKE_ARGS.format(bf16="ON" if "avx512_bf16" in flags else "OFF"))
    target = str(wheel) if wheel else "llama-cpp-python"
    print(f"[bench quant] installing {target} (CMAKE_ARGS={env['CMAKE_ARGS']})", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", target], env=env)
    if done.returncode != 0:
        raise EdgeLLMError("could not install llama-cpp-python; build a wheel with the CMAKE_ARGS above and pass "
                           "--llama-cpp-wheel PATH, or drop --vs-llama-cpp")
    return _llama_cpp_build()


def _llama_cpp_build() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}: {llama_cpp.llama_print_system_info().decode().strip()}"


# ---------------------------------------------------------------------------------------------- driver


def _parse_formats(text: str) -> list[str]:
    from edgellm.quant.formats import WeightFormat

    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in UNQUANTIZED + GGUF_FILE_FORMATS:
            WeightFormat.parse(name)  # raises a one-line error naming the valid formats
    return names


def _source(args: argparse.Namespace, pool: ProcessPoolExecutor, workdir: Path) -> tuple[Path, str]:
    if args.random_llama:
        out = workdir / f"random-llama-{args.random_llama}"
        return Path(pool.submit(build_random_llama, args.random_llama, str(out)).result()), out.name
    if args.model:
        return Path(args.model), Path(args.model).name
    from edgellm.assets import default_model_path

    return Path(default_model_path()), "built-in"


def build_random_llama(size: str, out: str) -> str:
    """A seeded random-init Llama of bench speed's shape in bf16, with the built-in model's byte-level BPE:
    llama.cpp needs a real tokenizer in the GGUF, even when ids are fed directly. The 250m takes the built-in's
    8192-token vocabulary (as in earlier runs); a shape named after a released model keeps its own, since its
    embedding and head are a large share of its bytes (the GGUF export pads the token list)."""
    from edgellm.assets import default_model_path
    from edgellm.bench.speed import import_transformers
    from edgellm.checkpoint import read_config

    transformers = import_transformers()
    builtin = Path(default_model_path())
    keys = ("bos_token_id", "eos_token_id") + (("vocab_size",) if size == "250m" else ())
    ids = {k: v for k, v in read_config(builtin).items() if k in keys}
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**RANDOM_LLAMAS[size], **ids})
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin / name, Path(out) / name)
    return out


def _windows(path: Path, args: argparse.Namespace) -> list[list[int]]:
    if args.ppl_tokens <= 0:
        return []
    from edgellm.bench.kv import heldout_ids
    from edgellm.tokenizer import Tokenizer

    ids = heldout_ids(Tokenizer(path), args.ppl_tokens)
    w = args.ppl_window + 1
    return [ids[i:i + w] for i in range(0, len(ids) - w + 1, w)]


@torch.inference_mode()
def dram_roofs(threads: list[int]) -> dict[int, float]:
    """DRAM read GB/s at each thread count: the faster of an fp32 GEMV and a plain sum over a buffer far above any
    L3, so a decode's % of it is against what this many cores can stream (one Zen 4 core reads ~23 GB/s, two ~40)."""
    buf = torch.ones(512 * MIB // 4)
    roofs = {}
    for t in threads:
        with torch_threads(t):
            roofs[t] = max(measure_read_bandwidth(), buf.nbytes / _timed(buf.sum, 5) / 1e9)
    return roofs


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) if path.is_dir() else path.stat().st_size




def run(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize, measure, print the table, write --json/--plot; returns the report."""
    from edgellm.quant.convert import quantize_checkpoint

    formats = _parse_formats(args.formats)
    llama_version = ensure_llama_cpp(args.llama_cpp_wheel) if args.vs_llama_cpp else None
    with torch_threads(max(args.threads)):
        hw = measure_hardware()
    roofs = dram_roofs(args.threads)
    generator = torch.Generator().manual_seed(0)
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
    rows: list[dict[str, Any]] = []
    with pool, tempfile.TemporaryDirectory(prefix="edgellm-bench-quant-") as tmp:
        workdir = Path(tmp)
        path, name = _source(args, pool, workdir)
        from edgellm.checkpoint import read_config

        config = read_config(path)
        prompt = torch.randint(0, int(config["vocab_size"]), (args.prompt_len,), generator=generator).tolist()
        windows = _windows(path, args)
        reference = str(workdir / "reference.pt")
        if windows:
            pool.submit(_reference_logprobs, str(path), "fp32", windows, reference).result()
        for fmt in formats:
            print(f"[bench quant] {name}: {fmt}", file=sys.stderr)
            if fmt in UNQUANTIZED:
                target, dtype = path, fmt
            elif fmt in GGUF_FILE_FORMATS:
                if not args.vs_llama_cpp:
                    raise EdgeLLMError(f"format {fmt} is made by llama.cpp's quantizer: add --vs-llama-cpp")
                target, dtype = _llama_cpp_file(pool, path, workdir, fmt), None
            else:
                target, dtype = workdir / fmt, None
                quantize_checkpoint(path, target, fmt)
            row: dict[str, Any] = {"engine": "edgellm", "format": fmt, "file_mib": _checkpoint_bytes(target) / MIB,
                                   "speed": {}}
            theirs = _llama_cpp_row(pool, path, workdir, LLAMA_CPP_PAIRS[fmt], fmt) \
                if args.vs_llama_cpp and fmt in LLAMA_CPP_PAIRS else None
            for threads in args.threads:
                ours, other = [], []
                for _ in range(args.rounds):
                    ours.append(pool.submit(_edgellm_speed, str(target), dtype, threads, prompt, args.decode_tokens,
                                            args.reps, args.op_split).result())
                    if theirs is not None:
                        other.append(pool.submit(_llama_cpp_speed, theirs["path"], threads, prompt,
                                                 args.decode_tokens, args.reps).result())
                speed = best_round(ours)
                speed["decode_pct_bandwidth"] = 100 * speed["decode_bytes"] * speed["decode_tok_s"] / 1e9 / \
                    roofs[threads]
                row["speed"][threads] = speed
                row["bits_per_weight"] = speed.pop("bits_per_weight")
                if theirs is not None:
                    theirs["speed"][threads] = best_round(other)
            if windows:
                row["quality"] = pool.submit(_edgellm_quality, str(target), dtype, windows, reference).result()
            rows.append(row)
            if theirs is not None:
                if windows:
                    theirs["quality"] = pool.submit(_llama_cpp_quality, theirs["path"], windows, reference).result()
                del theirs["path"]
                rows.append(theirs)
            if target != path and target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
    _add_ratios(rows)
    report = {"benchmark": "quant", "model": name,
              "settings": {"formats": formats, "threads": args.threads, "prompt_len": args.prompt_len,
                           "decode_tokens": args.decode_tokens, "reps": args.reps, "rounds": args.rounds,
                           "ppl_tokens": args.ppl_tokens,
                           "ppl_window": args.ppl_window, "llama_cpp": llama_version},
              "hardware": {**hw.to_json(), "cpu_flags": cpu_flags(), "dram_read_gbs_by_threads": roofs}, "rows": rows,
              "notes": ["quality is against the unquantized checkpoint run in fp32 (reference log-probs stored "
                        "in bf16); perplexity over non-overlapping windows of held-out stdlib text",
                        "decode_pct_bandwidth = bytes read per decode step (every stored weight once, one "
                        "embedding row) x tok/s / the DRAM read bandwidth measured at the same thread count "
                        "(dram_read_gbs_by_threads: the faster of an fp32 GEMV and a sum over 512 MiB)",
                        "dequant_share_pct: time to dequantize every projection once / one decode step; 0 where "
                        "the kernel reads the packed weights directly (LUT / int8 dot products)"]}
    print_table(report)
    if args.op_split:
        _print_op_split(report)
    write_report(report, args.json, args.plot, plot)
    return report


def _llama_cpp_row(pool: ProcessPoolExecutor, path: Path, workdir: Path, lc_type: str,
                   paired: str) -> dict[str, Any]:
    """llama.cpp's row for `paired`, speeds to fill; "path" is the GGUF it runs (dropped from the report)."""
    gguf = _llama_cpp_file(pool, path, workdir, lc_type)
    return {"engine": "llama.cpp", "format": lc_type, "paired_with": paired, "file_mib": gguf.stat().st_size / MIB,
            "speed": {}, "path": str(gguf)}


def best_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest decode of alternated rounds (that round's other figures with it) and the fastest prefill; each
    round's two speeds are kept under "rounds" when there were several."""
    best = dict(max(runs, key=lambda r: r["decode_tok_s"]))
    best["prefill_tok_s"] = max(r["prefill_tok_s"] for r in runs)
    if len(runs) > 1:
        best["rounds"] = [{k: r[k] for k in ("decode_tok_s", "prefill_tok_s")} for r in runs]
    return best


def _llama_cpp_file(pool: ProcessPoolExecutor, path: Path, workdir: Path, lc_type: str) -> Path:
    """The GGUF llama.cpp runs for `lc_type`: edgellm's export for the types it writes, else llama.cpp's quantizer
    applied to the f16 export (made once per run)."""
    from edgellm.quant.gguf_write import export_gguf

    gguf = workdir / f"{lc_type}.gguf"
    if gguf.exists():
        return gguf
    if lc_type in ("f16", "q8_0", "q4_0"):
        export_gguf(path, gguf, lc_type)
    else:
        f16 = workdir / "f16.gguf"
        if not f16.exists():
            export_gguf(path, f16, "f16")
        pool.submit(_llama_cpp_quantize, str(f16), str(gguf), lc_type).result()
    return gguf


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """edgellm / llama.cpp per paired format and thread count, on the llama.cpp row."""
    ours = {r["format"]: r for r in rows if r["engine"] == "edgellm"}
    for row in rows:
        if row["engine"] != "llama.cpp":
            continue
        mine = ours[row["paired_with"]]
        row["edgellm_over_llama_cpp"] = {
            str(t): {k: mine["speed"][t][k] / s[k] for k in ("decode_tok_s", "prefill_tok_s")}
            for t, s in row["speed"].items()}
        if "quality" in row and "quality" in mine:
            row["edgellm_over_llama_cpp"]["perplexity"] = mine["quality"]["perplexity"] / \
                row["quality"]["perplexity"]


def print_table(report: dict[str, Any]) -> None:
    """One row per engine and format: size, bits, speed per thread count, quality, and ratios to llama.cpp."""
    from rich.console import Console
    from rich.table import Table

    threads = report["settings"]["threads"]
    roofs = report["hardware"].get("dram_read_gbs_by_threads") or {"": report["hardware"]["mem_read_gbs"]}
    dram = ", ".join(f"{t}T {gbs:.1f}" if t != "" else f"{gbs:.1f}" for t, gbs in roofs.items())
    table = Table(title=f"bench quant: {report['model']} (DRAM read {dram} GB/s)")
    for col in ["engine", "format", "MiB", "bits/w", *[f"decode tok/s ({t}T)" for t in threads],
                *[f"prefill tok/s ({t}T)" for t in threads], "RSS/file", "fused gain",
                *[f"% BW ({t}T)" for t in threads], "dequant %", "ppl", "KL", "top-1 %"]:
        table.add_column(col, justify="right")
    for row in report["rows"]:
        first = row["speed"][threads[0]]
        ratio = row.get("edgellm_over_llama_cpp", {})
        q = row.get("quality", {})

        def speed(t: int, key: str, row: dict = row, ratio: dict = ratio) -> str:
            value = f"{row['speed'][t][key]:.1f}"
            return value + (f" ({ratio[str(t)][key]:.2f}x)" if ratio else "")

        table.add_row(row["engine"], row["format"], f"{row['file_mib']:.1f}",
                      f"{row['bits_per_weight']:.2f}" if "bits_per_weight" in row else "-",
                      *[speed(t, "decode_tok_s") for t in threads], *[speed(t, "prefill_tok_s") for t in threads],
                      f"{first['rss_mib'] / row['file_mib']:.2f}x",
                      f"{first['decode_tok_s'] / first['decode_tok_s_op_at_a_time']:.2f}x"
                      if "decode_tok_s_op_at_a_time" in first else "-",
                      *[f"{row['speed'][t]['decode_pct_bandwidth']:.0f}"
                        if "decode_pct_bandwidth" in row["speed"][t] else "-" for t in threads],
                      f"{first['dequant_share_pct']:.0f}" if "dequant_share_pct" in first else "-",
                      f"{q['perplexity']:.2f}" if q else "-", f"{q['mean_kl']:.4f}" if q else "-",
                      f"{q['top1_agreement_pct']:.1f}" if q else "-")
    Console(width=220).print(table)
    print("fused gain: decode with the fused native step over the same decode op at a time, first thread count")
    print("RSS/file: the process's RSS after load, prefill and decode (KV cache included) over its RSS with the "
          "engine imported and no model loaded, / the file size; first thread count")
    if report["settings"]["llama_cpp"]:
        print("(x) on llama.cpp rows: edgellm / llama.cpp for the paired edgellm format, same thread count; "
              f"{report['settings']['llama_cpp']}")


def _print_op_split(report: dict[str, Any]) -> None:
    """A table per thread count, a column per edgellm format, with the paired llama.cpp step where measured."""
    from edgellm.bench.opsplit import print_op_split

    ours = [r for r in report["rows"] if r["engine"] == "edgellm"]
    llama_cpp = {r["paired_with"]: r["speed"] for r in report["rows"] if r["engine"] == "llama.cpp"}
    context = ours[0]["speed"][report["settings"]["threads"][0]]["op_split"]["context"]
    for t in report["settings"]["threads"]:
        splits = {r["format"]: r["speed"][t]["op_split"] for r in ours}
        reference = {fmt: 1000 / speed[t]["decode_tok_s"] for fmt, speed in llama_cpp.items()}
        print_op_split(f"one decode step by op, {t} thread(s): ms (% of the timed step), {context}-token prompt",
                       splits, reference)


def plot(report: dict[str, Any], out: Path) -> None:
    """Decode speed vs bits and KL divergence vs bits, edgellm and llama.cpp points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_quality) = plt.subplots(1, 2, figsize=(12, 4.5))
    t = report["settings"]["threads"][-1]
    ours = [r for r in report["rows"] if r["engine"] == "edgellm"]
    for r in ours:
        ax_speed.scatter(r["bits_per_weight"], r["speed"][t]["decode_tok_s"], color="tab:blue")
        ax_speed.annotate(r["format"], (r["bits_per_weight"], r["speed"][t]["decode_tok_s"]), fontsize=8)
        if "quality" in r:
            ax_quality.scatter(r["bits_per_weight"], max(r["quality"]["mean_kl"], 1e-6), color="tab:blue")
            ax_quality.annotate(r["format"], (r["bits_per_weight"], max(r["quality"]["mean_kl"], 1e-6)), fontsize=8)
    by_format = {r["format"]: r for r in ours}
    for r in report["rows"]:
        if r["engine"] == "llama.cpp":
            bits = by_format[r["paired_with"]]["bits_per_weight"]
            ax_speed.scatter(bits, r["speed"][t]["decode_tok_s"], color="tab:orange", marker="s")
            ax_speed.annotate(f"llama.cpp {r['format']}", (bits, r["speed"][t]["decode_tok_s"]), fontsize=8)
    ax_speed.set(xlabel="bits per weight", ylabel=f"decode tok/s ({t} threads)", title="speed vs bits")
    ax_quality.set(xlabel="bits per weight", ylabel="mean KL vs unquantized", yscale="log", title="quality vs bits")
    if not any("quality" in r for r in ours):
        ax_quality.text(0.5, 0.5, "quality not measured (--ppl-tokens 0)", ha="center", transform=ax_quality.transAxes)
    ax_speed.scatter([], [], color="tab:blue", label="edgellm")
    ax_speed.scatter([], [], color="tab:orange", marker="s", label="llama.cpp")
    ax_speed.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)

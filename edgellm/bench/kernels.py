"""`edgellm bench kernels`: low-bit GEMV (table lookup, VNNI) vs dequantize + matmul, and two-pass softmax.

Every figure in one table is measured side by side in the same run, so the ratios hold on a busy machine even when
the absolute times do not. GB/s is the weight bytes each method reads per call (packed codes and scales for the
low-bit paths) over its time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgellm.bench.common import positive_int, positive_ints, write_report
from edgellm.kernels.ggml_blocks import dequant_blocks_linear, q4_0_linear, q4_0_lut_weight, q8_0_linear, vnni_available
from edgellm.kernels.lut import LutWeight, dequant_linear, lut_available, lut_linear
from edgellm.kernels.native import gemv_bf16_op
from edgellm.kernels.select import SELECT_TABLE, crossover_table
from edgellm.kernels.softmax import two_pass_softmax

# (name, N, K): square and MLP shapes, the 250m random Llama (fused qkv, gate+up, down) and the built-in model
SHAPES = {
    "2048x2048": (2048, 2048), "5632x2048": (5632, 2048), "4096x4096": (4096, 4096),
    "250m.qkv": (1536, 1024), "250m.gate_up": (5632, 1024), "250m.down": (1024, 2816),
    "default.gate_up": (3072, 384), "default.lm_head": (8192, 384),
}
SECTIONS = ("lowbit", "ggml", "softmax")
MIN_SECONDS = 0.05  # each timing repeats a call until this long, then keeps the best of --reps such runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", type=_shapes, default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    p.add_argument("--bits", type=positive_ints, default="2,3,4", help="low-bit widths of the LUT section")
    p.add_argument("--group", type=int, choices=(32, 64, 128), default=64, help="group size of the LUT section")
    p.add_argument("--rows", type=positive_ints, default="1,8", help="rows of x (1 = decode)")
    p.add_argument("--threads", type=positive_ints, default="1", help="thread counts, each a full pass")
    p.add_argument("--vocab", type=positive_ints, default="8192,32000,128000", help="softmax widths")
    p.add_argument("--reps", type=positive_int, default=3, help="timed runs per figure, best kept")
    p.add_argument("--sections", type=_sections, default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--write-select", action="store_true",
                   help=f"store the measured LUT/VNNI-vs-dequant crossovers in {SELECT_TABLE.name} (kernel choice)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")


def _shapes(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SHAPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown shapes {bad}; choose from {', '.join(SHAPES)}")
    return names


def _sections(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in SECTIONS for n in names):
        raise argparse.ArgumentTypeError(f"sections must be among {', '.join(SECTIONS)}")
    return names


def seconds(reps: int, fn: Callable[..., Any], *args: Any) -> float:
    """Best per-call time of fn(*args) over `reps` runs, each repeating the call for at least MIN_SECONDS."""
    fn(*args)
    best = float("inf")
    for _ in range(reps):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < MIN_SECONDS or calls == 0:
            fn(*args)
            calls += 1
        best = min(best, elapsed / calls)
    return best


def random_lowbit(n: int, k: int, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = -(-k // group)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, groups) * 0.02
    return codes, scales, -scales * (2**bits - 1) / 2


def lowbit_rows(shapes: list[str], bits_list: list[int], group: int, rows_list: list[int], reps: int) -> list[dict]:
    """LUT vs dequantize + matmul per shape, bit width and row count, with fp32 and bf16 dense GEMVs for scale."""
    out = []
    gemv = gemv_bf16_op()
    for name in shapes:
        n, k = SHAPES[name]
        dense = torch.randn(n, k) * 0.02
        dense16 = dense.bfloat16()
        for m in rows_list:
            x = torch.randn(m, k)
            fp32_s = seconds(reps, F.linear, x, dense)
            bf16_s = seconds(reps, gemv, x, dense16) if gemv is not None else None
            for bits in bits_list:
                codes, scales, biases = random_lowbit(n, k, bits, group)
                w = LutWeight.prepare(codes, scales, biases, bits, group)
                lut_s = seconds(reps, lut_linear, x, w)
                deq_s = seconds(reps, dequant_linear, x, codes, scales, biases, group)
                out.append(dict(shape=name, n=n, k=k, rows=m, bits=bits, group=group, lut_us=lut_s * 1e6,
                                dequant_us=deq_s * 1e6, fp32_us=fp32_s * 1e6,
                                bf16_us=None if bf16_s is None else bf16_s * 1e6, lut_gbs=w.nbytes() / lut_s / 1e9,
                                lut_vs_dequant=deq_s / lut_s, lut_vs_fp32=fp32_s / lut_s,
                                lut_vs_bf16=None if bf16_s is None else bf16_s / lut_s))
    return out


def ggml_rows(shapes: list[str], rows_list: list[int], reps: int) -> list[dict]:
    """Q8_0 and Q4_0 straight on GGUF blocks (VNNI) vs dequantize + matmul, and Q4_0 through the LUT."""
    out = []
    for name in shapes:
        n, k = SHAPES[name]
        d = (torch.rand(n, k // 32) * 0.01).half().view(torch.uint8).view(n, k // 32, 2)
        q8 = torch.cat([d, torch.randint(0, 256, (n, k // 32, 32), dtype=torch.uint8)], -1).view(n, -1)
        q4 = torch.cat([d, torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8)], -1).view(n, -1)
        lut4 = q4_0_lut_weight(q4, k)
        for m in rows_list:
            x = torch.randn(m, k)
            q8_s = seconds(reps, q8_0_linear, x, q8, k)
            q8_deq = seconds(reps, dequant_blocks_linear, x, q8, k, "q8_0")
            q4_s = seconds(reps, q4_0_linear, x, q4, k)
            q4_lut = seconds(reps, lut_linear, x, lut4)
            q4_deq = seconds(reps, dequant_blocks_linear, x, q4, k, "q4_0")
            out.append(dict(shape=name, n=n, k=k, rows=m, q8_0_vnni_us=q8_s * 1e6, q8_0_dequant_us=q8_deq * 1e6,
                            q8_0_gbs=q8.numel() / q8_s / 1e9, q8_0_vs_dequant=q8_deq / q8_s,
                            q4_0_vnni_us=q4_s * 1e6, q4_0_lut_us=q4_lut * 1e6, q4_0_dequant_us=q4_deq * 1e6,
                            q4_0_gbs=q4.numel() / q4_s / 1e9, q4_0_vnni_vs_dequant=q4_deq / q4_s,
                            q4_0_lut_vs_vnni=q4_s / q4_lut))
    return out


def softmax_rows(vocabs: list[int], rows_list: list[int], reps: int) -> list[dict]:
    out = []
    for v in vocabs:
        for m in rows_list:
            x = torch.randn(m, v) * 4
            two = seconds(reps, two_pass_softmax, x)
            ref = seconds(reps, torch.softmax, x, -1)
            out.append(dict(vocab=v, rows=m, two_pass_us=two * 1e6, torch_us=ref * 1e6, speedup=ref / two,
                            two_pass_gbs=3 * 4 * m * v / two / 1e9))  # reads x twice, writes y once
    return out


def _print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:>14.1f}" if isinstance(v, float) else f"{'-' if v is None else v!s:>14}")
        print("  ".join(cells))


def run(args: argparse.Namespace) -> None:
    previous = torch.get_num_threads()
    report: dict[str, Any] = dict(native=dict(lut=lut_available(), vnni=vnni_available()), runs=[])
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            run_ = dict(threads=threads)
            if "lowbit" in args.sections:
                run_["lowbit"] = lowbit_rows(args.shapes, args.bits, args.group, args.rows, args.reps)
                _print_table(f"low-bit GEMV, {threads} thread(s), group {args.group} (us; ratios = other/lut)",
                             run_["lowbit"], ["shape", "rows", "bits", "lut_us", "dequant_us", "fp32_us", "bf16_us",
                                              "lut_gbs", "lut_vs_dequant", "lut_vs_fp32", "lut_vs_bf16"])
            if "ggml" in args.sections:
                run_["ggml"] = ggml_rows(args.shapes, args.rows, args.reps)
                _print_table(f"GGUF blocks, {threads} thread(s) (us)", run_["ggml"],
                             ["shape", "rows", "q8_0_vnni_us", "q8_0_dequant_us", "q8_0_gbs", "q8_0_vs_dequant",
                              "q4_0_vnni_us", "q4_0_lut_us", "q4_0_dequant_us", "q4_0_vnni_vs_dequant",
                              "q4_0_lut_vs_vnni"])
            if "softmax" in args.sections:
                run_["softmax"] = softmax_rows(args.vocab, args.rows, args.reps)
                _print_table(f"softmax, {threads} thread(s) (us)", run_["softmax"],
                             ["vocab", "rows", "two_pass_us", "torch_us", "speedup", "two_pass_gbs"])
            report["runs"].append(run_)
    finally:
        torch.set_num_threads(previous)
    if args.write_select:
        table = crossover_table(report["runs"][0])
        SELECT_TABLE.write_text(json.dumps(table, indent=2) + "\n")
        print(f"\nkernel choice table written to {SELECT_TABLE}: {table}")
    write_report(report, args.json)

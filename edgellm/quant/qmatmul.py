"""Matmul against quantized weights: the one seam where the native LUT / VNNI kernels plug in.

Few rows of x (decode) go to a kernel that reads the packed weights directly: the T-MAC table lookup for 1-4 bit
linear codes (intN, ternary, Q4_0 repacked), VNNI int8 dot products for Q8_0, MXFP4, GGUF's other 32-blocks and
k-quant blocks (MXFP4's and IQ4_NL's levels are not linear, so no bit-plane lookup: a byte shuffle maps codes to int8
levels). Many rows (prefill) of bf16 activations against GGUF blocks run a tiled int8 GEMM on the blocks (twice
the multiply-adds per instruction of a bf16 GEMM) where the CPU has VNNI but no AMX. Other prefills, and a build
without the native kernels, dequantize a few rows of the weight at a time and run F.linear on them, so the
full-precision weight never exists in memory at once: for a bf16 model on a CPU that computes bf16 natively (AMX
or AVX512-BF16), in bf16 (the activations are bf16 already; AMX runs the GEMM several times faster than fp32), else
in fp32 (emulated bf16 GEMM is ~4x slower; an fp32 model keeps fp32 exactness).
`choose_kernel` holds the measured crossovers.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from edgellm.kernels.ggml_blocks import (
    GGUF_ONLY_LINEAR,
    KQUANT_LINEAR,
    gemv_simd,
    mxfp4_linear,
    q4_0_linear,
    q4_0_lut_weight,
    q8_0_linear,
)
from edgellm.kernels.lut import GROUPS, LutWeight, lut_available, lut_linear
from edgellm.kernels.native import cpu_has_amx, cpu_has_native_bf16
from edgellm.kernels.select import choose_kernel

if TYPE_CHECKING:  # typing only: formats imports nothing of this module
    from edgellm.quant.formats import QuantizedTensor

VNNI_LINEAR = {"q8_0": q8_0_linear, "mxfp4": mxfp4_linear, **GGUF_ONLY_LINEAR, **KQUANT_LINEAR}
# Read with int8 dot products too when no table-lookup copy was made (offloaded experts: no copy in RAM)
BLOCK_LINEAR = {**VNNI_LINEAR, "q4_0": q4_0_linear}
# From here on bf16 rows take the tiled int8 GEMM over the LUT too (Q4_0 1536 x 1024 on a Zen 4 core, 1 thread: LUT
# 18-22 us per row at 16-128 rows, tiled 25 at 16, 19 at 32, 12 at 128)
TILED_MIN_ROWS = 32
DEQUANT_CHUNK_ELEMENTS = 1 << 21  # fp32 weights dequantized per step: 8 MiB, about an L2-to-L3-sized tile


def prepare_lut(qt: QuantizedTensor) -> LutWeight | None:
    """The weight repacked for the table-lookup kernel, or None where it does not apply (no native build, Q8_0 and
    MXFP4 (VNNI reads their blocks as stored), a group size the kernel lacks)."""
    fmt = qt.fmt
    if not lut_available() or fmt.kind in VNNI_LINEAR:
        return None
    if fmt.kind == "q4_0":
        return q4_0_lut_weight(qt.data["blocks"], qt.shape[1])
    if fmt.group not in GROUPS:
        return None
    u = qt.unpacked_codes()
    return LutWeight.prepare(u.codes[:, :qt.shape[1]].contiguous(), u.scales, u.biases, u.bits, u.group)


def kernel_for(qt: QuantizedTensor, rows: int, lut: LutWeight | None, dtype: torch.dtype = torch.float32) -> str:
    """'lut', 'vnni' or 'dequant': what `quantized_linear` runs for `rows` rows of x in `dtype`."""
    n, k = qt.shape
    tiled = qt.fmt.kind in BLOCK_LINEAR and dtype == torch.bfloat16 and tiled_gemm(qt.fmt.kind)
    if tiled and rows >= TILED_MIN_ROWS:  # an fp32 prefill keeps dequantize + fp32 GEMM: exact, where this rounds x
        return "vnni"
    if qt.fmt.kind in VNNI_LINEAR or (lut is None and qt.fmt.kind in BLOCK_LINEAR):
        kernel = choose_kernel(8, n, k, rows)  # MXFP4 dequantizes slower than Q8_0: Q8_0's crossover is a safe bound
    elif lut is None:
        return "dequant"
    else:
        kernel = choose_kernel(qt.fmt.bits, n, k, rows)
    return "vnni" if tiled and kernel == "dequant" else kernel


def tiled_gemm(kind: str) -> bool:
    """Whether many bf16 rows against `kind`'s GGUF blocks run the tiled int8 GEMM (kgemm.h, bgemm.h): on a Zen 4 core
    0.6-0.8x the time of dequantize + bf16 GEMM (256 rows, 1 thread); with AMX, oneDNN's bf16 GEMM is several times
    faster."""
    return gemv_simd(kind) and not cpu_has_amx()


_buffers = threading.local()


def _chunk_buffer(rows: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """This thread's buffer for one dequantized row chunk (rows, k) on the CPU: a fresh multi-MiB tensor per chunk
    cost more in page faults and zeroing than the dequantization itself (measured on a Zen 4 core: ~40% of a Q4_0
    prefill). None elsewhere (the dequantization allocates)."""
    if device.type != "cpu":
        return None
    buffers = _buffers.__dict__
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < rows * k:
        buf = buffers[dtype] = torch.empty(max(rows * k, DEQUANT_CHUNK_ELEMENTS), dtype=dtype)
    return buf[:rows * k].view(rows, k)


def dequant_linear(x2: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """x (M, K) @ W.T in fp32, dequantizing W in row chunks (to bf16 for bf16 x where the CPU computes bf16)."""
    n, k = qt.shape
    dtype = torch.bfloat16 if x2.dtype == torch.bfloat16 and x2.is_cpu and cpu_has_native_bf16() else torch.float32
    x2 = x2.to(dtype)
    step = min(n, max(1, DEQUANT_CHUNK_ELEMENTS // k))
    y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x2.device)
    for start in range(0, n, step):
        rows = qt.rows(start, start + step)
        w = rows.dequantize(dtype, _chunk_buffer(rows.shape[0], k, dtype, x2.device))
        y[:, start:start + rows.shape[0]] = F.linear(x2, w)
    return y


def quantized_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                     lut: LutWeight | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for a quantized W [N, K]; returns x's dtype. `lut` is `prepare_lut(qt)`, made once."""
    n, k = qt.shape
    x2 = x.reshape(-1, k)
    kernel = kernel_for(qt, x2.shape[0], lut, x2.dtype)
    if kernel == "lut":
        y = lut_linear(x2, lut).float()
    elif kernel == "vnni":
        y = BLOCK_LINEAR[qt.fmt.kind](x2, qt.data["blocks"], k).float()
    else:
        y = dequant_linear(x2, qt)
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).view(*x.shape[:-1], n)

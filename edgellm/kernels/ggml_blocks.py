"""GEMV straight on GGUF blocks with int8 activations (AVX512-VNNI), plus the same math in PyTorch.

32-blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, MXFP4): activations are quantized per 32-block as llama.cpp does for
its q8_0 dot products (d = amax / 127, q = round(x / d), then d stored in fp16); each block contributes d_w * d_x *
(integer dot), summed in fp32. Q4_1 and Q5_1 (w = d * q + m) take q8_1 activations as llama.cpp does: also s =
sum(q) * d in fp16, so the min adds m * s per block.

k-quants (Q2_K..Q6_K, 256-element super-blocks): activations are quantized to Q8_K as llama.cpp does (per 256-block,
d = max / -127 in fp32 for the signed value of largest magnitude, with per-16 sums of q), see csrc/kquants.cpp.
"""

from __future__ import annotations

from functools import cache, partial
from typing import Any

import torch

from edgellm.errors import EdgeLLMError
from edgellm.kernels.ggml_layout import (
    GGML_BLOCK_BYTES,
    GGUF_ONLY_BLOCK_BYTES,
    IQ4_NL_LEVELS,
    KQUANT_BLOCK_BYTES,
    MXFP4_LEVELS,
    QK_K,
    e8m0_to_fp32_half,
)
from edgellm.kernels.lut import LutWeight
from edgellm.kernels.native import load_extension

BLOCK = 32
BLOCK_BYTES = {**GGML_BLOCK_BYTES, **GGUF_ONLY_BLOCK_BYTES}
# Nibble blocks: offsets of the 16 code bytes and of the 32-bit word of fifth bits (None: 4-bit codes), and the
# excess the unsigned codes carry (w = d * (code - excess)).
NIBBLES = {"q4_0": (2, None, 8), "q4_1": (4, None, 0), "q5_0": (6, 2, 16), "q5_1": (8, 4, 0), "iq4_nl": (2, None, 0)}
WITH_MINS = ("q4_1", "q5_1")  # w = d * q + m: a fp16 min after d


class BlockFormatError(EdgeLLMError):
    """GGUF blocks whose shape does not match the weight they claim to hold."""


@cache
def _ext() -> Any:
    return load_extension("ggml_blocks")


def vnni_available() -> bool:
    """True when the native Q8_0/Q4_0 kernels built (they use VNNI where the CPU has it, else plain C++)."""
    return _ext() is not None


def gemv_simd(kind: str) -> bool:
    """True when `kind`'s native GEMV was compiled with its AVX-512 VNNI path, not only the plain C++ one."""
    ext = _kext() if kind in KQUANT_BLOCK_BYTES else _ext()
    return ext is not None and ext.simd()


def _check(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> None:
    if k % BLOCK:
        raise BlockFormatError(f"{kind} weights need K to be a multiple of {BLOCK}, got {k}")
    if x.shape[-1] != k:
        raise BlockFormatError(f"x has {x.shape[-1]} features but the weight has K={k}")
    if blocks.dim() != 2 or blocks.dtype != torch.uint8 or blocks.shape[1] != k // BLOCK * BLOCK_BYTES[kind]:
        raise BlockFormatError(f"{kind} blocks must be uint8 (N, {k // BLOCK * BLOCK_BYTES[kind]}) for K={k}, "
                               f"got {tuple(blocks.shape)} {blocks.dtype}")


def _activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8-valued fp32 q (M, K/32, 32) and the unrounded fp32 d (M, K/32): d = amax / 127, q = round-half-even(x / d)
    with the exact 1/d, as llama.cpp's quantize_row_q8_0."""
    xb = x.view(x.shape[0], -1, BLOCK)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(xb * inv[..., None]), d


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 -> int8-valued fp32 q (M, K/32, 32) and d (M, K/32), rounding half to even; q is computed
    with the exact 1/d and d then rounded to fp16, as llama.cpp's quantize_row_q8_0 does."""
    q, d = _activations(x)
    return q, d.half().float()


def quantize_activations_q8_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_activations` plus llama.cpp q8_1's s (M, K/32) = sum(q) * d from the unrounded d, rounded to fp16."""
    q, d = _activations(x)
    return q, d.half().float(), (q.sum(-1) * d).half().float()


def block_scales(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The d of every block (fp16, or MXFP4's E8M0 exponent as 2^(e-128)), as fp32 (N, K/32)."""
    b = blocks.view(blocks.shape[0], -1, BLOCK_BYTES[kind])
    if kind == "mxfp4":
        return e8m0_to_fp32_half(b[..., 0])
    return _f16(b[..., :2])


def block_mins(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """Q4_1/Q5_1's fp16 min m of every block, as fp32 (N, K/32)."""
    return _f16(blocks.view(blocks.shape[0], -1, BLOCK_BYTES[kind])[..., 2:4])


def block_quants(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The integer weights q of every block (w = d * q (+ m); MXFP4's doubled E2M1 levels, IQ4_NL's int8 levels), as
    fp32 (N, K/32, 32)."""
    b = blocks.view(blocks.shape[0], -1, BLOCK_BYTES[kind])
    if kind == "mxfp4":
        codes = torch.cat([b[..., 1:] & 15, b[..., 1:] >> 4], dim=-1)
        return torch.tensor(MXFP4_LEVELS, dtype=torch.float32)[codes.long()]
    if kind == "q8_0":
        return b[..., 2:].contiguous().view(torch.int8).float()
    qs, qh, excess = NIBBLES[kind]
    codes = torch.cat([b[..., qs:qs + 16] & 15, b[..., qs:qs + 16] >> 4], dim=-1)
    if qh is not None:  # bit t of byte j of the word is element 8j + t's fifth bit
        high = (b[..., qh:qh + 4, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        codes = codes | (high.flatten(-2) << 4)
    if kind == "iq4_nl":
        return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)[codes.long()]
    return codes.float() - excess


def native_dequantize(blocks: torch.Tensor, k: int, kind: str, dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor | None:
    """(N, K) in fp32 (bit-identical to gguf.quants.dequantize) or bf16 from any 32-block or k-quant kind, natively
    and in parallel, into `out` (contiguous, N * K elements of `dtype`) when given; None without the native build or
    for another dtype."""
    ext = _kext() if kind in KQUANT_BLOCK_BYTES else _ext()
    if ext is None or dtype not in (torch.float32, torch.bfloat16):
        return None
    blocks = blocks.reshape(blocks.shape[0], -1)
    if kind in KQUANT_BLOCK_BYTES:
        _check_kquant(blocks, k, kind)
    out = torch.empty(blocks.shape[0], k, dtype=dtype) if out is None else out.view(blocks.shape[0], k)
    ext.dequantize_into(blocks, k, kind, out)
    return out


def blocks_dequantize(blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """fp32 (N, K) from 32-blocks, bit-identical to gguf.quants.dequantize (natively where built)."""
    w = native_dequantize(blocks, k, kind, torch.float32)
    return blocks_dequantize_reference(blocks, k, kind) if w is None else w


def blocks_dequantize_reference(blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """fp32 (N, K) from 32-blocks in PyTorch, rounding as gguf.quants.dequantize: d * q, then + m."""
    w = block_quants(blocks, kind) * block_scales(blocks, kind)[..., None]
    if kind in WITH_MINS:
        w = w + block_mins(blocks, kind)[..., None]
    return w.view(blocks.shape[0], k)


def blocks_linear_reference(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """The native kernels' math in PyTorch, in float64: sum over blocks of d_w * d_x * (integer dot) (+ m_w * s_x)."""
    _check(x, blocks, k, kind)
    xq, dx, sx = quantize_activations_q8_1(x.reshape(-1, k).float())
    dot = torch.einsum("mbi,nbi->mnb", xq.double(), block_quants(blocks, kind).double())
    y = (dot * (block_scales(blocks, kind).double()[None] * dx.double()[:, None])).sum(-1)
    if kind in WITH_MINS:
        y = y + sx.double() @ block_mins(blocks, kind).double().T
    return y.view(*x.shape[:-1], blocks.shape[0]).to(x.dtype)


def _linear(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    _check(x, blocks, k, kind)
    ext = _ext()
    if ext is None:
        return blocks_linear_reference(x, blocks, k, kind)
    x2 = x.reshape(-1, k)
    y = getattr(ext, f"{kind}_gemm")(x2 if x2.dtype == torch.bfloat16 else x2.float(), blocks, k)
    return y.view(*x.shape[:-1], blocks.shape[0]).to(x.dtype)


def q8_0_linear(x: torch.Tensor, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """y = x @ W.T for W as GGUF Q8_0 blocks uint8 (N, K/32 * 34); y has x's dtype (fp32 or bf16)."""
    return _linear(x, blocks, k, "q8_0")


def q4_0_linear(x: torch.Tensor, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """y = x @ W.T for W as GGUF Q4_0 blocks uint8 (N, K/32 * 18); y has x's dtype (fp32 or bf16)."""
    return _linear(x, blocks, k, "q4_0")


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """y = x @ W.T for W as GGUF MXFP4 blocks uint8 (N, K/32 * 17); y has x's dtype (fp32 or bf16)."""
    return _linear(x, blocks, k, "mxfp4")


# y = x @ W.T for W as GGUF Q4_1 / Q5_0 / Q5_1 / IQ4_NL blocks: GGUF_ONLY_LINEAR[kind](x, blocks, k)
GGUF_ONLY_LINEAR = {kind: partial(_linear, kind=kind) for kind in GGUF_ONLY_BLOCK_BYTES}


def dequant_blocks_linear(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """The baseline: dequantize the blocks to fp32 and F.linear (no activation quantization)."""
    _check(x, blocks, k, kind)
    return torch.nn.functional.linear(x.float(), blocks_dequantize(blocks, k, kind)).to(x.dtype)


def q4_0_lut_weight(blocks: torch.Tensor, k: int) -> LutWeight:
    """Q4_0 blocks repacked for `lut_linear` (codes = nibbles, scale = d, bias = -8d, groups of 32): measured faster
    than `q4_0_linear` at every shape of `edgellm bench kernels`, at the price of a repack when the model loads."""
    _check(torch.empty(0, k), blocks, k, "q4_0")
    n = blocks.shape[0]
    nibbles = blocks.view(n, -1, BLOCK_BYTES["q4_0"])[..., 2:]
    codes = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).view(n, k)
    d = block_scales(blocks, "q4_0")
    return LutWeight.prepare(codes, d, -8 * d, 4, BLOCK)


@cache
def _kext() -> Any:
    return load_extension("kquants")


def _check_kquant(blocks: torch.Tensor, k: int, kind: str) -> None:
    width = k // QK_K * KQUANT_BLOCK_BYTES[kind]
    if k % QK_K or blocks.dim() != 2 or blocks.dtype != torch.uint8 or blocks.shape[1] != width:
        raise BlockFormatError(f"{kind} blocks must be uint8 (N, K / {QK_K} * {KQUANT_BLOCK_BYTES[kind]}) for K "
                               f"a multiple of {QK_K}, got {tuple(blocks.shape)} {blocks.dtype} for K={k}")


def quantize_activations_q8k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 -> llama.cpp's Q8_K: int-valued fp32 q (M, K/256, 256), fp32 d (M, K/256) and the per-16 sums
    of q (M, K/256, 16). The signed value of largest magnitude (first wins) maps to -127: iscale = -127 / max, q =
    min(127, round-half-even(iscale * x)), d = 1 / iscale, all in fp32 as quantize_row_q8_K_ref."""
    xb = x.view(x.shape[0], -1, QK_K)
    peak = xb.gather(-1, xb.abs().argmax(-1, keepdim=True)).squeeze(-1)
    # full_like: torch computes `scalar / tensor` as scalar * (1 / tensor), a rounding apart from C's division
    iscale = torch.where(peak != 0, torch.full_like(peak, -127.0) / peak, 0.0)
    q = torch.round(xb * iscale[..., None]).clamp(max=127)
    d = torch.where(peak != 0, torch.ones_like(peak) / iscale, 0.0)
    return q, d, q.view(*q.shape[:2], 16, 16).sum(-1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _bits(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """(b >> s) & mask for each shift s, stacked on a new axis before the last: (..., len(shifts), b.shape[-1])."""
    return (b.unsqueeze(-2) >> torch.tensor(shifts, dtype=torch.uint8)[:, None]) & mask


def kquant_parts(blocks: torch.Tensor, kind: str) -> tuple[torch.Tensor, ...]:
    """Super-blocks decoded as w = (d * sc) * (u - offset) - dmin * m per 16 weights (Q4_K/Q5_K's scales and mins,
    per 32, repeated): codes u uint8 (N, B, 256), sc and m int32 (N, B, 16), d and dmin fp32 (N, B), offset as a
    0-d tensor. The layouts are ggml's (gguf.quants reads them the same way)."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, KQUANT_BLOCK_BYTES[kind])
    zero, no_mins = torch.zeros(b.shape[:2]), torch.zeros(*b.shape[:2], 16, dtype=torch.int32)
    offset = {"q6_k": 32, "q3_k": 4}.get(kind, 0)
    if kind in ("q4_k", "q5_k"):
        s = b[..., 4:16]
        lo, mlo, hi = s[..., :4], s[..., 4:8], s[..., 8:]
        sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], -1).repeat_interleave(2, -1)
        m = torch.cat([mlo & 63, (hi >> 4) | ((mlo >> 6) << 4)], -1).repeat_interleave(2, -1)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        qs = b[..., 16:144] if kind == "q4_k" else b[..., 48:176]
        u = _bits(qs.reshape(n, -1, 4, 32), [0, 4], 15).reshape(n, -1, QK_K)  # 64j + 32 * high + l
        if kind == "q5_k":
            u = u | (_bits(b[..., 16:48], list(range(8)), 1).reshape(n, -1, QK_K) << 4)  # bit t: 32t + l
    elif kind == "q6_k":
        low = _bits(b[..., :128].reshape(n, -1, 2, 64), [0, 4], 15)  # 128h + 64 * high + i
        high = _bits(b[..., 128:192].reshape(n, -1, 2, 32), [0, 2, 4, 6], 3)  # 128h + 32t + l
        u = (low.reshape(n, -1, QK_K) | (high.reshape(n, -1, QK_K) << 4))
        sc, m, d, dmin = b[..., 192:208].contiguous().view(torch.int8), no_mins, _f16(b[..., 208:210]), zero
    elif kind == "q2_k":
        u = _bits(b[..., 16:80].reshape(n, -1, 2, 32), [0, 2, 4, 6], 3).reshape(n, -1, QK_K)  # 128h + 32s + l
        sc, m, d, dmin = b[..., :16] & 15, b[..., :16] >> 4, _f16(b[..., 80:82]), _f16(b[..., 82:84])
    else:
        low2 = _bits(b[..., 32:96].reshape(n, -1, 2, 32), [0, 2, 4, 6], 3).reshape(n, -1, QK_K)
        u = low2 | (_bits(b[..., :32], list(range(8)), 1).reshape(n, -1, QK_K) << 2)
        s = b[..., 96:108]
        sc = (torch.cat([s[..., :8] & 15, s[..., :8] >> 4], -1)
              | (_bits(s[..., 8:], [0, 2, 4, 6], 3).reshape(n, -1, 16) << 4)).int() - 32
        m, d, dmin = no_mins, _f16(b[..., 108:110]), zero
    return u, sc.int(), m.int(), d, dmin, torch.tensor(offset)


def kquant_dequantize_reference(blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """fp32 (N, K) from k-quant blocks in PyTorch, rounding as gguf's dequantize: (d * sc) * (u - offset) - dmin * m,
    one rounding per operation."""
    _check_kquant(blocks, k, kind)
    u, sc, m, d, dmin, offset = kquant_parts(blocks, kind)
    n = blocks.shape[0]
    w = (d[..., None] * sc.float())[..., None] * (u.int() - offset).float().view(n, -1, 16, 16)
    if kind in ("q4_k", "q5_k", "q2_k"):
        w = w - (dmin[..., None] * m.float())[..., None]
    return w.view(n, k)


def kquant_dequantize(blocks: torch.Tensor, k: int, kind: str, dtype: torch.dtype = torch.float32,
                      portable: bool = False) -> torch.Tensor:
    """(N, K) from k-quant blocks: fp32 bit-identical to gguf.quants.dequantize, or bf16 that rounded (natively where
    built). `portable` runs the plain C++ path even where AVX-512 was compiled in (to test it)."""
    ext = _kext()
    if ext is None:
        return kquant_dequantize_reference(blocks, k, kind).to(dtype)
    _check_kquant(blocks, k, kind)
    out = torch.empty(blocks.shape[0], k, dtype=dtype)
    ext.dequantize_into(blocks, k, kind, out, portable)
    return out


def kquant_linear_reference(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """The native k-quant GEMV's math in PyTorch, exactly (float64): x quantized to Q8_K, then per super-block
    d_x * (d * sum_j sc_j * (u_j . q_j - offset * bsum_j) - dmin * sum_j m_j * bsum_j)."""
    _check_kquant(blocks, k, kind)
    xq, dx, bsums = quantize_activations_q8k(x.reshape(-1, k).float())
    u, sc, m, d, dmin, offset = kquant_parts(blocks, kind)
    n = blocks.shape[0]
    dots = torch.einsum("mbji,nbji->mnbj", xq.double().view(*xq.shape[:2], 16, 16),
                        u.double().view(n, -1, 16, 16))
    isum = (sc.double() * (dots - offset.double() * bsums.double()[:, None])).sum(-1)
    msum = (m.double() * bsums.double()[:, None]).sum(-1)
    y = (dx.double()[:, None] * (d.double() * isum - dmin.double() * msum)).sum(-1)
    return y.view(*x.shape[:-1], n).to(x.dtype)


def kquant_linear(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str, portable: bool = False) -> torch.Tensor:
    """y = x @ W.T for W as GGUF k-quant blocks uint8 (N, K/256 * bytes), x quantized to Q8_K; y has x's dtype.
    `portable` runs the plain C++ path even where AVX-512 VNNI was compiled in (to test it)."""
    _check_kquant(blocks, k, kind)
    if x.shape[-1] != k:
        raise BlockFormatError(f"x has {x.shape[-1]} features but the weight has K={k}")
    ext = _kext()
    if ext is None:
        return kquant_linear_reference(x, blocks, k, kind)
    x2 = x.reshape(-1, k)
    y = ext.gemm(x2 if x2.dtype == torch.bfloat16 else x2.float(), blocks, k, kind, portable)
    return y.view(*x.shape[:-1], blocks.shape[0]).to(x.dtype)


KQUANT_LINEAR = {kind: partial(kquant_linear, kind=kind) for kind in KQUANT_BLOCK_BYTES}

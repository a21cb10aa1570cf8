"""GEMV straight on GGUF Q8_0 / Q4_0 / MXFP4 blocks with int8 activations (AVX512-VNNI), plus the same math in PyTorch.

Activations are quantized per 32-block as llama.cpp does for its q8_0 dot products (d = amax / 127, q = round(x / d),
then d stored in fp16); each block contributes d_w * d_x * (integer dot), summed in fp32.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from edgellm.errors import EdgeLLMError
from edgellm.kernels.lut import LutWeight
from edgellm.kernels.native import load_extension
from edgellm.quant.formats import MXFP4_LEVELS, e8m0_to_fp32_half

BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "mxfp4": 17}


class BlockFormatError(EdgeLLMError):
    """GGUF blocks whose shape does not match the weight they claim to hold."""


@cache
def _ext() -> Any:
    return load_extension("ggml_blocks")


def vnni_available() -> bool:
    """True when the native Q8_0/Q4_0 kernels built (they use VNNI where the CPU has it, else plain C++)."""
    return _ext() is not None


def _check(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> None:
    if k % BLOCK:
        raise BlockFormatError(f"{kind} weights need K to be a multiple of {BLOCK}, got {k}")
    if x.shape[-1] != k:
        raise BlockFormatError(f"x has {x.shape[-1]} features but the weight has K={k}")
    if blocks.dim() != 2 or blocks.dtype != torch.uint8 or blocks.shape[1] != k // BLOCK * BLOCK_BYTES[kind]:
        raise BlockFormatError(f"{kind} blocks must be uint8 (N, {k // BLOCK * BLOCK_BYTES[kind]}) for K={k}, "
                               f"got {tuple(blocks.shape)} {blocks.dtype}")


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 -> int8-valued fp32 q (M, K/32, 32) and d (M, K/32), rounding half to even; q is computed
    with the exact 1/d and d then rounded to fp16, as llama.cpp's quantize_row_q8_0 does."""
    xb = x.view(x.shape[0], -1, BLOCK)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(xb * inv[..., None]), d.half().float()


def block_scales(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The d of every block (fp16, or MXFP4's E8M0 exponent as 2^(e-128)), as fp32 (N, K/32)."""
    b = blocks.view(blocks.shape[0], -1, BLOCK_BYTES[kind])
    if kind == "mxfp4":
        return e8m0_to_fp32_half(b[..., 0])
    return b[..., :2].contiguous().view(torch.float16).squeeze(-1).float()


def block_quants(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The integer weights q of every block (w = d * q; MXFP4's doubled E2M1 levels), as fp32 (N, K/32, 32)."""
    b = blocks.view(blocks.shape[0], -1, BLOCK_BYTES[kind])
    if kind == "mxfp4":
        codes = torch.cat([b[..., 1:] & 15, b[..., 1:] >> 4], dim=-1)
        return torch.tensor(MXFP4_LEVELS, dtype=torch.float32)[codes.long()]
    b = b[..., 2:]
    if kind == "q8_0":
        return b.contiguous().view(torch.int8).float()
    return torch.cat([b & 15, b >> 4], dim=-1).float() - 8


def blocks_linear_reference(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """The native kernels' math in PyTorch (integer dots are exact in fp32: |dot| < 2^24); the fallback path."""
    _check(x, blocks, k, kind)
    xq, dx = quantize_activations(x.reshape(-1, k).float())
    dot = torch.einsum("mbi,nbi->mnb", xq, block_quants(blocks, kind))
    y = (dot * (block_scales(blocks, kind)[None] * dx[:, None])).sum(-1)
    return y.view(*x.shape[:-1], blocks.shape[0]).to(x.dtype)


def _linear(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    _check(x, blocks, k, kind)
    ext = _ext()
    if ext is None:
        return blocks_linear_reference(x, blocks, k, kind)
    op = {"q8_0": ext.q8_0_gemm, "q4_0": ext.q4_0_gemm, "mxfp4": ext.mxfp4_gemm}[kind]
    y = op(x.reshape(-1, k).float(), blocks, k)
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


def dequant_blocks_linear(x: torch.Tensor, blocks: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """The baseline: dequantize the blocks to fp32 and F.linear (no activation quantization)."""
    _check(x, blocks, k, kind)
    w = (block_quants(blocks, kind) * block_scales(blocks, kind)[..., None]).view(blocks.shape[0], k)
    return torch.nn.functional.linear(x.float(), w).to(x.dtype)


def q4_0_lut_weight(blocks: torch.Tensor, k: int) -> LutWeight:
    """Q4_0 blocks repacked for `lut_linear` (codes = nibbles, scale = d, bias = -8d, groups of 32): measured faster
    than `q4_0_linear` at every shape of `edgellm bench kernels`, at the price of a repack when the model loads."""
    _check(torch.empty(0, k), blocks, k, "q4_0")
    n = blocks.shape[0]
    nibbles = blocks.view(n, -1, BLOCK_BYTES["q4_0"])[..., 2:]
    codes = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).view(n, k)
    d = block_scales(blocks, "q4_0")
    return LutWeight.prepare(codes, d, -8 * d, 4, BLOCK)

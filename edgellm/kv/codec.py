"""Group-wise affine quantization packed into bytes (x ≈ code·scale + zero, MLX-style), and a Hadamard rotation.

Scales and zeros are fp16. The zero is the group minimum rounded *down* to fp16 and the scale is rounded *up*,
so every element lies on the stored grid's range and round-to-nearest is off by at most scale/2.
`quantize` and `hadamard` run natively where the kernel builds (edgellm/kernels/csrc/kvcodec.cpp), bit-exact with
the PyTorch references `quantize_reference` and `hadamard_reference`, which stay the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.kernels.kvattn import hadamard_rows, quantize_packed

BITS = (8, 4, 2)


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes packed 8/bits per byte along `dim`, with one fp16 scale and zero per `group` elements of `dim`.

    `data` has `shape[dim] * bits / 8` entries along `dim`; `scales`/`zeros` have `shape[dim] / group`.
    """

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group: int
    shape: tuple[int, ...]
    dim: int = -1


def _check(bits: int, group: int, n: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group <= 0 or n % group or group % (8 // bits):
        raise ValueError(f"group {group} must divide {n} and be a multiple of {8 // bits} for {bits}-bit codes")


def _to_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """`x` rounded to fp16 in one direction (directed rounding keeps the grid covering the group's range)."""
    h = x.half()
    off = h.float() < x if up else h.float() > x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, float("inf") if up else float("-inf"))), h)


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits) along the last dim → bytes holding 8/bits codes each, lowest bits first."""
    if bits == 8:
        return codes
    return (codes.unflatten(-1, (-1, 8 // bits)) << _shifts(bits, codes.device)).sum(-1, dtype=torch.uint8)


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: bytes along the last dim → one uint8 code per element."""
    if bits == 8:
        return data
    # One scalar shift per code slot: ~2x faster on CPU than broadcasting against a tensor of shifts.
    mask = 2**bits - 1
    return torch.stack([(data >> shift) & mask for shift in range(0, 8, bits)], -1).flatten(-2)


def quantize(x: torch.Tensor, bits: int = 4, group: int = 64, dim: int = -1) -> QuantizedTensor:
    """Round-to-nearest affine quantization of `x` in groups of `group` consecutive elements along `dim`."""
    dim = dim % x.dim()
    if dim >= x.dim() - 2:  # the layouts caches store: groups along head_dim, or along tokens per channel
        _check(bits, group, x.shape[dim])
        found = quantize_packed(x, bits, group, channel_groups=dim == x.dim() - 2)
        if found is not None:
            return QuantizedTensor(*found, bits, group, tuple(x.shape), dim)
    return quantize_reference(x, bits, group, dim)


def quantize_reference(x: torch.Tensor, bits: int = 4, group: int = 64, dim: int = -1) -> QuantizedTensor:
    """`quantize` in PyTorch: the reference the native kernel matches bit for bit, and its fallback."""
    dim = dim % x.dim()
    last = x.movedim(dim, -1).float()
    _check(bits, group, last.shape[-1])
    levels = 2**bits - 1
    g = last.unflatten(-1, (-1, group))
    zeros = _to_fp16(g.amin(-1), up=False)
    scales = _to_fp16((g.amax(-1) - zeros.float()) / levels, up=True)
    step = scales.float().unsqueeze(-1)
    codes = torch.round((g - zeros.float().unsqueeze(-1)) / torch.where(step > 0, step, 1.0))
    data = pack(codes.clamp_(0, levels).to(torch.uint8).flatten(-2), bits)
    return QuantizedTensor(data.movedim(-1, dim), scales.movedim(-1, dim), zeros.movedim(-1, dim), bits, group,
                           tuple(x.shape), dim)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float tensor of `q.shape`; computed in fp32 (exact code·scale + zero) and cast to `dtype` once."""
    codes = unpack(q.data.movedim(q.dim, -1), q.bits).unflatten(-1, (-1, q.group)).float()
    x = codes * q.scales.movedim(q.dim, -1).float().unsqueeze(-1) + q.zeros.movedim(q.dim, -1).float().unsqueeze(-1)
    return x.flatten(-2).movedim(-1, q.dim).to(dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of `x` by the normalised Hadamard matrix (in fp32); applying it twice gives `x` back.

    Rotating keys spreads outlier channels over all channels before quantizing; since the rotation is orthogonal,
    attention rotates the queries the same way instead of un-rotating keys (q·k = qH·kH).
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-2 size, got {n}")
    found = hadamard_rows(x, n**-0.5)
    return hadamard_reference(x) if found is None else found.to(x.dtype)


def hadamard_reference(x: torch.Tensor) -> torch.Tensor:
    """`hadamard` in PyTorch as the fast Walsh-Hadamard butterfly (log2 n stages of a+b, a-b in fp32, then one
    scaling), so the native kernel, doing the same operations, matches it bit for bit."""
    n = x.shape[-1]
    y = x.float()
    half = 1
    while half < n:
        pairs = y.unflatten(-1, (-1, 2, half))
        a, b = pairs.select(-2, 0), pairs.select(-2, 1)
        y = torch.stack([a + b, a - b], -2).flatten(-3)
        half *= 2
    return (y * n**-0.5).to(x.dtype)

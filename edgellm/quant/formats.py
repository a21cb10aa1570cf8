"""Weight formats: llama.cpp's 32-block (Q8_0, Q4_0, MXFP4, ...) and k-quant layouts, group-affine intN and ternary.

Every format stores a row-major weight [N, K] as per-row tensors (`QuantizedTensor.data`), so rows can be sliced
for block-wise dequantization, and every format can be read as integer codes with a per-group affine map
(`unpacked_codes()`), the one shape a lookup-table kernel needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.kernels.ggml_blocks import blocks_dequantize, kquant_dequantize, native_dequantize
from edgellm.kernels.ggml_layout import MXFP4_LEVELS, e8m0_to_fp32_half
from edgellm.kernels.lut import codes_dequantize
from edgellm.layouts import (  # the names this module held before the planner needed them without torch
    GGML_BLOCK,
    GGML_BLOCK_BYTES,
    KQUANT_BLOCK_BYTES,
    QuantFormatError,
    WeightFormat,
    format_names,
)

METHODS = ("rtn", "mse")
MSE_RATIOS = tuple(1 - 0.025 * i for i in range(1, 21))  # range shrink factors tried by method="mse"
CHUNK_ELEMENTS = 1 << 20  # weights quantized per pass; bounds the fp32 temporaries (MXFP4's search holds 16 per weight)


@dataclass
class UnpackedCodes:
    """Codes as the LUT kernel reads them: w[n, k] = levels[codes[n, k]] * scales[n, k // group] + biases[...].

    `levels` is arange(2**bits) for every format but mxfp4, whose 16 levels are the doubled E2M1 values.
    Codes past K (padding of the last group) are arbitrary: a kernel must pad x with zeros there.
    """

    codes: torch.Tensor  # uint8 [N, K_padded]
    scales: torch.Tensor  # float32 [N, G]
    biases: torch.Tensor  # float32 [N, G]
    levels: torch.Tensor  # float32 [2**bits]
    bits: int
    group: int


@dataclass
class QuantizedTensor:
    """A quantized [N, K] weight: `data` holds exactly the tensors stored on disk, each with N rows."""

    fmt: WeightFormat
    shape: tuple[int, int]
    data: dict[str, torch.Tensor]

    def rows(self, start: int, end: int) -> QuantizedTensor:
        """Rows start..end as a view, for block-wise dequantization."""
        end = min(end, self.shape[0])
        return QuantizedTensor(self.fmt, (end - start, self.shape[1]), {k: v[start:end] for k, v in self.data.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def unpacked_codes(self) -> UnpackedCodes:
        """Integer codes [N, K_padded] and float32 per-group scales/biases (see UnpackedCodes)."""
        fmt, n = self.fmt, self.shape[0]
        if fmt.read_only:  # affine (or IQ4_NL's levels) per 16/32 weights, but no kernel reads them as plain codes
            raise QuantFormatError(f"{fmt.name} weights have no unpacked-code form; dequantize them")
        if fmt.block_layout:
            blocks = self.data["blocks"].reshape(n, -1, GGML_BLOCK_BYTES[fmt.kind])
            if fmt.kind == "mxfp4":  # low nibbles hold elements 0..15 of the block, high nibbles 16..31
                codes = torch.cat([blocks[..., 1:] & 0x0F, blocks[..., 1:] >> 4], dim=-1)
                scales = e8m0_to_fp32_half(blocks[..., 0])
                return UnpackedCodes(codes.reshape(n, -1), scales, torch.zeros_like(scales),
                                     torch.tensor(MXFP4_LEVELS, dtype=torch.float32), fmt.bits, fmt.group)
            scales = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
            if fmt.kind == "q8_0":
                codes, biases = blocks[..., 2:] ^ 0x80, scales * -128  # int8 q as the uint8 code q + 128
            else:
                codes, biases = torch.cat([blocks[..., 2:] & 0x0F, blocks[..., 2:] >> 4], dim=-1), scales * -8
            levels = torch.arange(2**fmt.bits, dtype=torch.float32)
            return UnpackedCodes(codes.reshape(n, -1), scales, biases, levels, fmt.bits, fmt.group)
        codes = unpack_codes(self.data["codes"], fmt.bits)
        return UnpackedCodes(codes, self.data["scales"].float(), self.data["biases"].float(),
                             torch.arange(2**fmt.bits, dtype=torch.float32), fmt.bits, fmt.group)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The [N, K] weight the stored tensors represent (bit-identical to gguf's dequantize for block formats), in
        `out` (contiguous, N * K elements of `dtype`) when given: prefill reuses one buffer for every row chunk."""
        fmt, (n, k) = self.fmt, self.shape
        if fmt.block_layout:  # the GGUF kinds: natively, in parallel
            w = native_dequantize(self.data["blocks"], k, fmt.kind, dtype, out)
            if w is not None:
                return w
        if fmt.kind == "q8_0":
            blocks = self.data["blocks"].view(n, -1, 34)
            d = blocks[..., :2].contiguous().view(torch.float16).float()
            w = blocks[..., 2:].view(torch.int8).float().mul_(d)
        elif fmt.kind == "q4_0":
            blocks = self.data["blocks"].view(n, -1, 18)
            d = blocks[..., :2].contiguous().view(torch.float16).float()
            qs = blocks[..., 2:]
            w = torch.cat([qs & 0x0F, qs >> 4], -1).view(torch.int8).sub_(8).float().mul_(d)
        elif fmt.kind == "mxfp4":
            u = self.unpacked_codes()
            w = u.levels[u.codes.int()].view(n, -1, GGML_BLOCK).mul_(u.scales.unsqueeze(-1))
        elif fmt.read_only:
            decode = kquant_dequantize if fmt.kind in KQUANT_BLOCK_BYTES else blocks_dequantize
            w = decode(self.data["blocks"], k, fmt.kind)
        else:
            w = codes_dequantize(self.data["codes"], self.data["scales"], self.data["biases"], k, fmt.bits, fmt.group,
                                 dtype, out)
            if w is not None:
                return w
            g = self.data["scales"].shape[1]
            codes = unpack_codes(self.data["codes"], fmt.bits).view(n, g, -1)
            w = codes.float().mul_(self.data["scales"].float().unsqueeze(-1)).add_(
                self.data["biases"].float().unsqueeze(-1))
        w = w.view(n, -1)[:, :k]
        return w.to(dtype) if out is None else out.view(n, k).copy_(w)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] (K a multiple of 8) packed little-endian along K: code j of each 8 sits at bits j*b of b bytes."""
    n, k = codes.shape
    c = codes.to(torch.int32).view(n, k // 8, 8)
    word = (c << (torch.arange(8, dtype=torch.int32) * bits)).sum(-1)  # disjoint bit fields: sum == or
    shifts = torch.arange(bits, dtype=torch.int32) * 8
    return ((word.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).view(n, k * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes [N, K]; uint8 ops with scalar shifts (several times faster than int32)."""
    n = packed.shape[0]
    if bits != 3:  # codes never straddle a byte
        mask = 2**bits - 1
        return torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], -1).view(n, -1)
    b0, b1, b2 = packed.view(n, -1, 3).unbind(-1)
    return torch.stack([b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7, (b1 >> 4) & 7,
                        (b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5], -1).view(n, -1)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero exactly as ggml's roundf (gguf's np_roundf): trunc + (fraction >= 0.5)."""
    a = x.abs()
    f = a.floor()
    return torch.sign(x) * (f + (2 * (a - f)).floor())


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    blocks = w.view(-1, GGML_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, 1 / d)
    qs = round_half_away(blocks * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([d.half().view(torch.uint8), qs], -1)


def _q4_0(w: torch.Tensor) -> torch.Tensor:
    blocks = w.view(-1, GGML_BLOCK)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude, first wins
    d = peak / -8
    inv = torch.where(d == 0, 0.0, 1 / d)
    qs = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
    qs = qs[:, :16] | (qs[:, 16:] << 4)
    return torch.cat([d.half().view(torch.uint8), qs], -1)


def _mxfp4(w: torch.Tensor) -> torch.Tensor:
    blocks = w.view(-1, GGML_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2 + 127, 0).clamp(0, 254).to(torch.uint8)
    d = e8m0_to_fp32_half(e)
    levels = torch.tensor(MXFP4_LEVELS, dtype=torch.float32)
    errs = (d.unsqueeze(-1) * levels - blocks.unsqueeze(-1)).abs()  # nearest level, first on ties (as gguf)
    qs = errs.argmin(-1).to(torch.uint8)
    qs = qs[:, :16] | (qs[:, 16:] << 4)
    return torch.cat([e, qs], -1)


BLOCK_QUANTIZERS = {"q8_0": _q8_0, "q4_0": _q4_0, "mxfp4": _mxfp4}


def mxfp4_from_packed(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OCP MX FP4 as HF's gpt-oss release stores it — codes uint8 [..., G, 16], E8M0 exponents uint8 [..., G] — as
    mxfp4 rows uint8 [..., G * 17] of llama.cpp's block_mxfp4 (one exponent byte, then 16 code bytes).

    Both mean w = E2M1(code) · 2^(e − 127) with the same 4-bit codes (sign bit 3) and the same exponent byte (ggml's
    doubled levels take 2^(e − 128)); only the nibble order differs: byte j holds elements 2j (low) and 2j + 1
    (high) in HF's, elements j and j + 16 in ggml's. Hence ggml byte 2m takes the low nibbles of HF bytes m and
    m + 8, byte 2m + 1 their high nibbles: a byte shuffle, one new tensor the size of the inputs.
    """
    out = torch.empty(*scales.shape, 1 + 16, dtype=torch.uint8, device=blocks.device)
    out[..., 0] = scales
    first, second = blocks[..., :8], blocks[..., 8:]
    pairs = out[..., 1:].unflatten(-1, (8, 2))
    torch.bitwise_or(first & 0x0F, second << 4, out=pairs[..., 0])
    torch.bitwise_or(first >> 4, second & 0xF0, out=pairs[..., 1])
    return out.flatten(-2)


def _group_view(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] as [N, G, group], the last group padded by repeating the row's last weight (min/max unchanged),
    and the count of real weights per group [G]."""
    n, k = w.shape
    kp = -(-k // group) * group
    if kp != k:
        w = torch.cat([w, w[:, -1:].expand(n, kp - k)], 1)
    counts = torch.full((kp // group,), group, dtype=torch.float32)
    counts[-1] = group - (kp - k)
    return w.view(n, kp // group, group), counts


def _affine_codes(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 scale and bias mapping [lo, hi] onto 0..qmax, and the round-to-nearest codes of g under them."""
    scale, bias = ((hi - lo) / qmax).half(), lo.half()
    s, b = scale.float().unsqueeze(-1), bias.float().unsqueeze(-1)
    return scale, bias, torch.where(s > 0, torch.round((g - b) / s), 0.0).clamp(0, qmax)


def _affine(w: torch.Tensor, fmt: WeightFormat, method: str) -> dict[str, torch.Tensor]:
    g, _ = _group_view(w, fmt.group)
    qmax = 2**fmt.bits - 1
    lo, hi = g.amin(-1), g.amax(-1)
    scale, bias, q = _affine_codes(g, lo, hi, qmax)
    if method == "mse":  # shrink [lo, hi] per group where clipping a few outliers lowers the squared error
        real = (torch.arange(g.shape[1] * g.shape[2]) < w.shape[1]).view(g.shape[1:])

        def error(sc: torch.Tensor, bi: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
            return ((codes * sc.float().unsqueeze(-1) + bi.float().unsqueeze(-1) - g).square() * real).sum(-1)

        best = error(scale, bias, q)
        for ratio in MSE_RATIOS:
            sc, bi, qq = _affine_codes(g, lo * ratio, hi * ratio, qmax)
            err = error(sc, bi, qq)
            better = err < best
            best = torch.where(better, err, best)
            scale, bias = torch.where(better, sc, scale), torch.where(better, bi, bias)
            q = torch.where(better.unsqueeze(-1), qq, q)
    return {"codes": pack_codes(q.to(torch.uint8).view(w.shape[0], -1), fmt.bits), "scales": scale, "biases": bias}


def _ternary(w: torch.Tensor, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    g, counts = _group_view(w, fmt.group)
    pad = g.shape[1] * fmt.group - w.shape[1]
    absmean = g.abs().sum(-1)
    if pad:  # the padding repeats the last weight; leave it out of the mean
        absmean[:, -1] -= pad * w[:, -1].abs()
    scale = (absmean / counts).half()
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round((g / s).clamp(-1, 1)), 0.0)
    codes = (q + 1).to(torch.uint8).view(w.shape[0], -1)
    return {"codes": pack_codes(codes, 2), "scales": scale, "biases": -scale}


def check_method(fmt: WeightFormat, method: str) -> None:
    """Raise QuantFormatError unless `method` applies to `fmt` (mse clipping exists for the affine formats only)."""
    if method not in METHODS or (method == "mse" and fmt.kind != "affine"):
        raise QuantFormatError(f"method {method!r} does not apply to {fmt.name}; use rtn"
                               + (" or mse" if fmt.kind == "affine" else ""))


def quantize(weight: torch.Tensor, fmt: str | WeightFormat, method: str = "rtn") -> QuantizedTensor:
    """Quantize a [N, K] weight (any float dtype; computed in fp32) into `fmt`, in row chunks to bound memory.

    method "rtn" rounds to nearest from each group's min/max; "mse" (affine formats only) also tries shrunken
    ranges per group and keeps the one with the least squared error.
    """
    fmt = WeightFormat.parse(fmt)
    if fmt.read_only:
        raise QuantFormatError(f"edgellm reads {fmt.name} from GGUF files but does not quantize to it; use one of "
                               f"{', '.join(format_names())}")
    fmt.check_shape(tuple(weight.shape))
    check_method(fmt, method)
    n, k = weight.shape
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, step):
        w = weight[start:start + step].to(torch.float32).contiguous()
        if fmt.block_layout:
            chunk = {"blocks": BLOCK_QUANTIZERS[fmt.kind](w).reshape(w.shape[0], -1)}
        elif fmt.kind == "ternary":
            chunk = _ternary(w, fmt)
        else:
            chunk = _affine(w, fmt, method)
        for key, t in chunk.items():
            parts.setdefault(key, []).append(t)
    return QuantizedTensor(fmt, (n, k), {key: torch.cat(ts) for key, ts in parts.items()})

"""Table-lookup (T-MAC) GEMV for 1-4 bit group-affine weights, with a PyTorch path doing the same integer math.

A weight matrix W (N, K) arrives format-neutral: integer `codes` in [0, 2^bits), and per row and group of `group`
columns a `scale` and `bias`, W[n, k] = codes[n, k] * scales[n, k // group] + biases[n, k // group]. q4_0 is bits=4,
bias=-8*scale, group=32; ternary is bits=2 with codes {0, 1, 2} and bias=-scale.

Per call, each group of four activations gets a 16-entry table of its signed sums (+-x0 +-x1 +-x2 +-x3), quantized
to int8 with one step per (row of x, group). A weight then costs a 4-bit table index per bit plane instead of a
multiply, and the tables are shared by all N rows. The int8 step bounds the error: each lookup is off by at most
step/2, step = max_quad(|x0|+|x1|+|x2|+|x3|) / 127 over the group (see `lut_error_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from edgellm.errors import EdgeLLMError
from edgellm.kernels.native import load_extension

TILE_ROWS, TILES = 16, 4
BLOCK_ROWS = TILE_ROWS * TILES  # output rows per packed block (the kernel's register tile)
CHUNK = 32  # columns per packed chunk: 8 quads, two nibbles per byte
GROUPS = (32, 64, 128)
FP16_MAX = 65504.0
DEQUANT_ROWS = 256  # rows of W dequantized at a time by `dequant_linear`: ~1-4 MB of fp32, cache-sized


class LutFormatError(EdgeLLMError):
    """Low-bit weights whose shapes, bit width or group size the table-lookup kernel cannot take."""


@cache
def _ext() -> Any:
    return load_extension("lut")


def lut_available() -> bool:
    """True when the native table-lookup kernel built and loaded (else `lut_linear` runs the PyTorch path)."""
    return _ext() is not None


@dataclass(frozen=True)
class LutWeight:
    """A weight repacked for `lut_linear`: bit-plane indices in the kernel's layout and the group scales and biases.

    `scale` and `bias` are stored as given, in fp16 (2 x 16 bits per row and group, as decode reads them every step;
    exact for every stored format, whose scales and biases are fp16 already). The kernel widens them to fp32 and folds
    them there: with bits read as -1/+1, the code sum_p 2^p b_p equals (sum_p 2^p (2 b_p - 1) + 2^bits - 1) / 2, so
    the lookups are weighted by scale / 2 and the constant half rides on sum(x) per group with bias + (2^bits - 1) /
    2 * scale (`folded`).
    """

    packed: torch.Tensor  # uint8 [blocks, chunks, TILES, bits, 64]
    scale: torch.Tensor  # fp16 [blocks, groups, TILES, TILE_ROWS]
    bias: torch.Tensor  # fp16 [blocks, groups, TILES, TILE_ROWS]
    n: int
    k: int
    bits: int
    group: int

    @staticmethod
    def prepare(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group: int) -> LutWeight:
        """Split codes into bit planes and lay them out for the kernel; done once when the model loads. fp32 scales
        and biases are rounded to the nearest fp16."""
        check_format(codes, scales, biases, bits, group)
        n, k = codes.shape
        blocks, chunks, groups = -(-n // BLOCK_ROWS), -(-k // CHUNK), -(-k // group)
        c = torch.zeros(blocks * BLOCK_ROWS, chunks * CHUNK, dtype=torch.uint8)
        c[:n, :k] = codes
        planes = torch.stack([(c >> p) & 1 for p in range(bits)])  # [bits, rows, cols]
        q = planes.view(bits, -1, chunks, 2, 4, 4)  # quad j = 8 * chunk + 4 * half + t, weight i within the quad
        index = q[..., 0] | q[..., 1] << 1 | q[..., 2] << 2 | q[..., 3] << 3  # [bits, rows, chunks, half, t]
        byte = index[..., 0, :] | index[..., 1, :] << 4
        packed = byte.view(bits, blocks, TILES, TILE_ROWS, chunks, 4).permute(1, 4, 2, 0, 3, 5).contiguous()

        def lay_out(values: torch.Tensor) -> torch.Tensor:
            v = torch.zeros(blocks * BLOCK_ROWS, groups, dtype=torch.float16)
            v[:n] = values
            return v.view(blocks, TILES, TILE_ROWS, groups).permute(0, 3, 1, 2).contiguous()

        return LutWeight(packed.view(blocks, chunks, TILES, bits, 64), lay_out(scales), lay_out(biases), n, k, bits,
                         group)

    def folded(self) -> torch.Tensor:
        """The fp32 bias the kernel multiplies sum(x) by: bias + (2^bits - 1) / 2 * scale (the product is exact)."""
        return self.bias.float() + 0.5 * (2**self.bits - 1) * self.scale.float()

    def nbytes(self) -> int:
        """Bytes the kernel reads per call: the indices and the fp16 scales and biases."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.bias))


def check_format(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group: int) -> None:
    """Raise LutFormatError unless the arrays describe one N x K weight the kernel supports."""
    if not 1 <= bits <= 4:
        raise LutFormatError(f"table-lookup weights need 1 to 4 bits per code, got {bits}")
    if group not in GROUPS:
        raise LutFormatError(f"group size must be one of {GROUPS}, got {group}")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise LutFormatError(f"codes must be a 2-D uint8 tensor, got {tuple(codes.shape)} {codes.dtype}")
    n, k = codes.shape
    want = (n, -(-k // group))
    if tuple(scales.shape) != want or tuple(biases.shape) != want:
        raise LutFormatError(f"scales and biases must be {want} for codes {n}x{k} in groups of {group}, "
                             f"got {tuple(scales.shape)} and {tuple(biases.shape)}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise LutFormatError(f"codes must be below 2^{bits}, found {int(codes.max())}")
    for name, v in (("scales", scales), ("biases", biases)):
        if v.isfinite().all() and not v.half().isfinite().all():
            raise LutFormatError(f"{name} must fit fp16 (|value| <= {FP16_MAX}), found {v.abs().max().item():g}")


def lut_linear(x: torch.Tensor, w: LutWeight) -> torch.Tensor:
    """y = x @ W.T by table lookup; x is fp32 or bf16 (..., K) and y has x's dtype. Meant for few rows of x (decode)."""
    if x.shape[-1] != w.k:
        raise LutFormatError(f"x has {x.shape[-1]} features but the weight expects {w.k}")
    ext = _ext()
    if ext is None:
        return lut_linear_reference(x, w)
    x2 = x.reshape(-1, w.k).float()
    y = ext.lut_gemm(x2, w.packed, w.scale, w.bias, w.n, w.k, w.bits, w.group)
    return y.view(*x.shape[:-1], w.n).to(x.dtype)


def build_tables(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 tables [M, quads, 16], table steps [M, groups] and group sums of x [M, groups], as the kernel builds
    them (sums added left to right, round half to even), so both paths agree to the last bit."""
    m, k = x.shape
    groups = -(-k // group)
    xp = F.pad(x, (0, -k % CHUNK)).view(m, -1, 4)
    sign = torch.tensor([[1.0 if e >> t & 1 else -1.0 for t in range(4)] for e in range(16)])  # [entry, t]
    sums = xp[..., None, 0] * sign[:, 0]
    for t in range(1, 4):
        sums = sums + xp[..., None, t] * sign[:, t]
    a = xp.abs()
    reach = ((a[..., 0] + a[..., 1]) + a[..., 2]) + a[..., 3]  # [M, quads]: the largest |entry| of each quad
    top = F.pad(reach, (0, groups * group // 4 - reach.shape[1])).view(m, groups, group // 4).amax(-1)
    inv = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    inv_q = inv.repeat_interleave(group // 4, dim=1)[:, :reach.shape[1]]
    tables = torch.round(sums * inv_q[..., None]).clamp(-127, 127).to(torch.int8)
    xsum = F.pad(x, (0, groups * group - k)).view(m, groups, group).sum(-1)
    return tables, top / 127.0, xsum


def lut_linear_reference(x: torch.Tensor, w: LutWeight) -> torch.Tensor:
    """The kernel's math in PyTorch: int8 tables, int32 lookups per group, then fp32 scales. The fallback path."""
    x2 = x.reshape(-1, w.k).float()
    m = x2.shape[0]
    tables, step, xsum = build_tables(x2, w.group)  # [M, quads, 16], [M, G], [M, G]
    blocks, chunks = w.packed.shape[:2]
    byte = w.packed.view(blocks, chunks, TILES, w.bits, TILE_ROWS, 4).permute(3, 0, 2, 4, 1, 5)
    index = torch.stack([byte & 15, byte >> 4], dim=-2).reshape(w.bits, blocks * BLOCK_ROWS, chunks * 8)
    quads = tables.shape[1]
    flat = tables.view(m, -1).int()
    where = (torch.arange(quads) * 16 + index.long())  # [bits, rows, quads]
    acc = torch.zeros(m, blocks * BLOCK_ROWS, quads, dtype=torch.int32)
    for p in range(w.bits):
        acc += flat[:, where[p].view(-1)].view(m, -1, quads) << p
    groups = step.shape[1]
    per_quad = w.group // 4
    acc = F.pad(acc, (0, groups * per_quad - quads)).view(m, -1, groups, per_quad).sum(-1)  # [M, rows, G]
    scale = w.scale.float().permute(0, 2, 3, 1).reshape(-1, groups)  # [rows, G]
    bias = w.folded().permute(0, 2, 3, 1).reshape(-1, groups)
    y = (acc.float() * (scale * (0.5 * step[:, None, :])) + bias * xsum[:, None, :]).sum(-1)[:, :w.n]
    return y.view(*x.shape[:-1], w.n).to(x.dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = codes * scale + bias per group, exactly (the reference the kernels are tested against)."""
    n, k = codes.shape
    if k % group == 0:  # one fused multiply-add over a (rows, groups, group) view
        w = torch.addcmul(biases.to(dtype)[..., None], codes.to(dtype).view(n, -1, group), scales.to(dtype)[..., None])
        return w.view(n, k)
    s = scales.to(dtype).repeat_interleave(group, dim=1)[:, :k]
    b = biases.to(dtype).repeat_interleave(group, dim=1)[:, :k]
    return codes.to(dtype) * s + b


def codes_dequantize(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, k: int, bits: int,
                     group: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """W (N, K) in fp32 or bf16 from packed affine codes (quant.formats.pack_codes) and fp16 group scales/biases,
    natively, into `out` when given (prefill's reused chunk buffer); the product and the sum rounded apart, as the
    PyTorch dequantization does. None without the native build or for another dtype."""
    ext = _ext()
    if ext is None or dtype not in (torch.float32, torch.bfloat16) or bits > 4:
        return None
    n = codes.shape[0]
    out = torch.empty(n, k, dtype=dtype) if out is None else out.view(n, k)
    ext.codes_dequantize_into(codes.contiguous(), scales.contiguous(), biases.contiguous(), k, bits, group, out)
    return out


def dequant_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                   group: int) -> torch.Tensor:
    """The baseline: dequantize DEQUANT_ROWS rows of W at a time to fp32 and F.linear them; y has x's dtype."""
    x2 = x.reshape(-1, codes.shape[1]).float()
    parts = [F.linear(x2, dequantize(codes[i:i + DEQUANT_ROWS], scales[i:i + DEQUANT_ROWS],
                                     biases[i:i + DEQUANT_ROWS], group))
             for i in range(0, codes.shape[0], DEQUANT_ROWS)]
    return torch.cat(parts, dim=1).view(*x.shape[:-1], codes.shape[0]).to(x.dtype)


def lut_error_bound(x: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Worst-case |lut_linear - exact| per output [M, N] from the int8 tables alone (fp32 rounding aside).

    Each lookup is off by at most step/2; a group has group/4 quads per plane, planes weigh 2^p, and the sum is
    multiplied by scale/2: bound = sum_g |scale_g| / 2 * step_g / 2 * (2^bits - 1) * (group / 4).
    """
    _, step, _ = build_tables(x.reshape(-1, x.shape[-1]).float(), group)
    return (step * (group / 16 * (2**bits - 1))) @ scales.float().abs().T

"""Matmul against quantized weights: the one seam where native LUT / VNNI kernels plug in.

The baseline dequantizes a few rows of the weight at a time to fp32 and runs F.linear on them (this CPU emulates
bf16), so the full-precision weight never exists in memory at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from edgellm.quant.formats import QuantizedTensor

DEQUANT_CHUNK_ELEMENTS = 1 << 21  # fp32 weights dequantized per step: 8 MiB, about an L2-to-L3-sized tile


def quantized_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for a quantized W [N, K]; returns x's dtype."""
    n, k = qt.shape
    x32 = x.reshape(-1, k).to(torch.float32)
    step = max(1, DEQUANT_CHUNK_ELEMENTS // k)
    if step >= n:
        y = F.linear(x32, qt.dequantize())
    else:
        y = torch.empty(x32.shape[0], n, dtype=torch.float32, device=x.device)
        for start in range(0, n, step):
            y[:, start:start + step] = F.linear(x32, qt.rows(start, start + step).dequantize())
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).view(*x.shape[:-1], n)

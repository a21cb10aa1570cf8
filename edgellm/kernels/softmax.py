"""Two-pass softmax (Dukhan & Ablavatski, 2020): the sum of exp(x) is kept as (mantissa, exponent), so no max pass.

Large logits cannot overflow (each exp is a pair p * 2^n until the final scaling) and -inf logits give exactly 0.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch

from edgellm.kernels.native import load_extension

FLOOR = -1e30  # logits are clamped here first, so -inf gets a finite, hopelessly small exponent


@cache
def _ext() -> Any:
    return load_extension("softmax")


def two_pass_softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """The same split in PyTorch: exp(x) = p * 2^n, normalised by the sum at the largest exponent. The fallback.

    The reduction x - n ln 2 runs in fp64, standing in for the kernel's fused multiply-adds.
    """
    x = x.double().clamp(min=FLOOR)
    n = torch.round(x * (1 / math.log(2)))
    p = torch.exp((x - n * math.log(2)).clamp(-0.35, 0.35))
    scaled = p * torch.exp2(n - n.amax(-1, keepdim=True))
    return (scaled / scaled.sum(-1, keepdim=True)).float()


def two_pass_softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, fp32 out; native two passes over x where the extension builds."""
    ext = _ext()
    if ext is None or x.shape[-1] == 0:
        return two_pass_softmax_reference(x)
    return ext.two_pass_softmax(x.float())

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
LN2_HI, LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 split so n * LN2_HI is exact


@cache
def _ext() -> Any:
    return load_extension("softmax")


def two_pass_softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """The same split in PyTorch: exp(x) = p * 2^n, normalised by the sum at the largest exponent. The fallback."""
    x = x.float().clamp(min=FLOOR)
    n = torch.round(x * (1 / math.log(2)))
    p = torch.exp(((x - n * LN2_HI) - n * LN2_LO).clamp(-0.35, 0.35))
    scaled = p * torch.exp2(n - n.amax(-1, keepdim=True))
    return scaled / scaled.sum(-1, keepdim=True)


def two_pass_softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, fp32 out; native two passes over x where the extension builds."""
    ext = _ext()
    if ext is None or x.shape[-1] == 0:
        return two_pass_softmax_reference(x)
    return ext.two_pass_softmax(x.float())

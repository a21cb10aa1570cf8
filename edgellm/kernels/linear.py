"""Linear layers: a native bf16 GEMV for decode, fp32 GEMM where bf16 GEMM is emulated, else F.linear."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.kernels.native import cpu_has_native_bf16, gemv_bf16_op, load_extension

# Without hardware bf16, up to here the native kernel beats fp32 upcast + GEMM and bf16 F.linear beats the upcast
# (measured at 2048x8192: the upcast's cost is converting the weight on every call; both cross over at ~128 rows).
FEW_ROWS = 64
GROUP_ROWS = 8  # rows of x the native kernel holds in registers per pass over the weights (kGroupRows)


@cache
def native_max_rows() -> int:
    """Rows up to which the native kernel is used; past one group, hardware bf16 (AMX) GEMM should overtake it."""
    return GROUP_ROWS if cpu_has_native_bf16() else FEW_ROWS


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The pure-PyTorch path for CPU bf16 weights: many rows upcast to fp32, as emulated bf16 GEMM is ~4x slower."""
    if x.dtype == weight.dtype and (cpu_has_native_bf16() or x.numel() <= FEW_ROWS * weight.shape[-1]):
        return F.linear(x, weight, bias)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias, dispatched by shape and dtype; runs ~100 times per token, so checks stay cheap."""
    if weight.dtype is not torch.bfloat16 or not weight.is_cpu or (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return F.linear(x, weight, bias)  # the native kernel has no backward
    if x.numel() <= native_max_rows() * weight.shape[-1] and weight.is_contiguous():  # else it would copy W
        gemv = gemv_bf16_op()
        if gemv is not None:
            return gemv(x, weight, bias)
    return torch_linear(x, weight, bias)


def lora_bgmv(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], bt: list[torch.Tensor], slots: torch.Tensor,
              scales: torch.Tensor, ranks: list[int], starts: list[int]) -> bool:
    """For each projection p of a fused output: y[..., starts[p]:starts[p] + N_p] (B, T, ·) += scales[p, i] ·
    (x[i] A_ps^T) B_ps^T for s = slots[p, i] (-1: none), in place, in one native call; False (y untouched) where the
    native kernel does not apply. a[p] (S·ranks[p], K) and bt[p] (S·ranks[p], N_p) stack S adapters' A and Bᵀ."""
    op = _bgmv_op()
    if op is None or not (x.is_cpu and y.stride(-1) == 1 and all(t.is_contiguous() for t in a + bt)) or (
            torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in a + bt))):
        return False
    op(y, x.contiguous(), a, bt, slots, scales, ranks, starts)
    return True


@cache
def _bgmv_op() -> Callable[..., torch.Tensor] | None:
    ext = load_extension("gemv")
    return None if ext is None else ext.lora_bgmv


class Linear(nn.Linear):
    """nn.Linear whose forward goes through edgellm's kernel dispatch (same parameter names as HF)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def fuse_linears(*layers: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for projections that read the same input, e.g. q/k/v or gate/up.

    Decode reads each weight once per token either way, but one larger GEMV costs one dispatch instead of
    several. The layers' own parameters become views into the fused tensor, so nothing is stored twice and
    state_dict names stay those of the checkpoint.
    """
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    start = 0
    for layer in layers:
        n = layer.weight.shape[0]
        layer.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias

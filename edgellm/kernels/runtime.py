"""What this machine computes in: the model dtype `auto` picks, and the native kernels to warm before a request."""

from __future__ import annotations

import torch

from edgellm.errors import CheckpointError
from edgellm.kernels.decode import decode_ops_available
from edgellm.kernels.native import cpu_has_native_bf16, native_available

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def default_dtype(device: str = "cpu") -> torch.dtype:
    """bf16 where the hardware runs it natively, fp32 otherwise (emulated bf16 GEMM is ~4x slower than fp32)."""
    if device.startswith("cuda") or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str = "cpu") -> torch.dtype:
    """A dtype name (or `auto`/None for this machine's default) as a torch dtype; unknown names are refused."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16 or auto")
    return DTYPES[dtype]


def warm_kernels(dtype: torch.dtype, device: str) -> None:
    """Build or load the native kernels a CPU model calls now, not inside the first token's latency."""
    if device == "cpu":
        decode_ops_available()
        if dtype == torch.bfloat16:
            native_available()

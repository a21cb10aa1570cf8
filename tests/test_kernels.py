"""The native bf16 GEMV and the `linear` dispatch, against a plain fp32 PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from edgellm.kernels.linear import FEW_ROWS, GROUP_ROWS, linear, torch_linear
from edgellm.kernels.native import gemv_bf16_op

SHAPES = [(1000, 33), (4097, 7), (32, 64), (31, 1), (2048, 129), (7001, 3)]  # (K, N): tails, odd N, partial blocks


@pytest.fixture(scope="module")
def gemv():
    op = gemv_bf16_op()
    if op is None:
        pytest.skip("native kernel unavailable (no compiler or ninja, or EDGELLM_NO_NATIVE=1)")
    return op


def make(rows: int, K: int, N: int, dtype: torch.dtype, bias: bool,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.abs().max().item() + 1e-6
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-5  # bf16 output carries 8 bits of mantissa
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=1e-3 * scale)


@pytest.mark.parametrize("rows", range(1, GROUP_ROWS + 1))  # each row count has its own register blocking
@pytest.mark.parametrize(("K", "N"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_fp32_reference(gemv, rows, K, N, dtype, bias):
    x, w, b = make(rows, K, N, dtype, bias)
    assert_close(gemv(x, w, b), reference(x, w, b), dtype)


def test_gemv_keeps_leading_dims_and_accepts_strided_x(gemv):
    x, w, b = make(6, 300, 17, torch.float32, bias=True)
    x3 = x.view(2, 3, 300)
    assert_close(gemv(x3, w, b), reference(x3, w, b), torch.float32)
    strided = torch.randn(300, 4).T  # 4 rows, not contiguous
    assert_close(gemv(strided, w), reference(strided, w, None), torch.float32)


def test_gemv_edge_sizes(gemv):
    w = torch.randn(5, 0).bfloat16()
    b = torch.randn(5)
    torch.testing.assert_close(gemv(torch.randn(2, 0), w, b), b.expand(2, 5))
    assert gemv(torch.randn(0, 8), torch.randn(5, 8).bfloat16()).shape == (0, 5)


@pytest.mark.parametrize("rows", [9, 16, 43])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_many_rows_in_groups_of_eight(gemv, rows, dtype):
    x, w, b = make(rows, 1000, 300, dtype, bias=True)  # 300 rows of weights span three L2 panels
    assert_close(gemv(x, w, b), reference(x, w, b), dtype)


@pytest.mark.parametrize("rows", [1, 5, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_and_torch_fallback_agree_with_reference(rows, dtype):
    x, w, b = make(rows, 1000, 33, dtype, bias=True)
    ref = reference(x, w, b)
    with torch.no_grad():
        assert_close(linear(x, w, b), ref, dtype)
    assert_close(torch_linear(x, w, b), ref, dtype)


def test_linear_with_grad_uses_autograd():
    x, w, b = make(2, 64, 8, torch.bfloat16, bias=True)
    w.requires_grad_()
    linear(x, w, b).float().sum().backward()
    torch.testing.assert_close(w.grad.float(), x.float().sum(0).expand(8, 64), rtol=2**-7, atol=1e-2)


def test_no_native_env_falls_back_to_torch():
    code = ("import torch; from edgellm.kernels import linear; from edgellm.kernels.native import native_available;"
            "x = torch.randn(3, 100).bfloat16(); w = torch.randn(7, 100).bfloat16();"
            "assert not native_available();"
            "torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))")
    env = {**os.environ, "EDGELLM_NO_NATIVE": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)

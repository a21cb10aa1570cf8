"""Two-pass softmax against torch.softmax, including logits that overflow exp() and masked (-inf) logits."""

from __future__ import annotations

import pytest
import torch

from edgellm.kernels.softmax import two_pass_softmax, two_pass_softmax_reference


def assert_softmax_close(y: torch.Tensor, x: torch.Tensor) -> None:
    ref = torch.softmax(x.double(), -1)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y.double().sum(-1), torch.ones(x.shape[:-1], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("vocab", [1, 5, 16, 31, 33, 1000, 32000])
@pytest.mark.parametrize("impl", [two_pass_softmax, two_pass_softmax_reference])
def test_matches_torch_softmax(vocab, impl):
    x = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)) * 8
    assert_softmax_close(impl(x), x)


@pytest.mark.parametrize("impl", [two_pass_softmax, two_pass_softmax_reference])
def test_extremes(impl):
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    x[0, 7] = 1000.0  # exp overflows fp32: the result is one-hot
    x[1] += 5000.0  # every logit huge
    x[2, ::3] = float("-inf")  # masked logits
    x[3] -= 1e4  # every logit hugely negative: exp underflows, the ratios must not
    x[4, :299] = float("-inf")  # one logit left
    y = impl(x)
    assert_softmax_close(y, x)
    assert (y[2, ::3] == 0).all() and y[4, 299] == 1.0 and y[0, 7] == 1.0


def test_keeps_leading_dims_and_bf16_input():
    x = torch.randn(2, 3, 100).bfloat16()
    y = two_pass_softmax(x)
    assert y.shape == (2, 3, 100) and y.dtype == torch.float32
    assert_softmax_close(y, x.float())

"""Compute kernels; models call `Linear`, which picks the fastest path for the shape at hand."""

from edgellm.kernels.linear import Linear, linear

__all__ = ["Linear", "linear"]

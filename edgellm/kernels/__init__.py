"""Compute kernels; models call `Linear`, which picks the fastest path for the shape at hand."""

from edgellm.kernels.linear import Linear, fuse_linears, linear

__all__ = ["Linear", "fuse_linears", "linear"]

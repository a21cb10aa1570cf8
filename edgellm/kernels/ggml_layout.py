"""The byte layouts of llama.cpp's weight blocks, as the native kernels read them (shared with edgellm.quant)."""

from __future__ import annotations

import torch

from edgellm.layouts import GGML_BLOCK, GGML_BLOCK_BYTES, GGUF_ONLY_BLOCK_BYTES, KQUANT_BLOCK_BYTES, QK_K

__all__ = ["GGML_BLOCK", "GGML_BLOCK_BYTES", "GGUF_ONLY_BLOCK_BYTES", "IQ4_NL_LEVELS", "KQUANT_BLOCK_BYTES",
           "MXFP4_LEVELS", "QK_K", "e8m0_to_fp32_half"]  # the block sizes live in edgellm.layouts (torch-free)
# IQ4_NL's int8 level per 4-bit code, as gguf.quants.IQ4_NL.kvalues / ggml's kvalues_iq4nl.
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# E2M1 values doubled, indexed by the 4-bit code (sign bit 3), as gguf.quants.MXFP4.kvalues / ggml's kvalues_mxfp4.
MXFP4_LEVELS = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """2**(e - 128) as float32, ggml's ggml_e8m0_to_fp32_half (the doubled E2M1 levels take the other half)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    return bits.view(torch.float32)

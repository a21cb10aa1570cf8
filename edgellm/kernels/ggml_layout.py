"""The byte layouts of llama.cpp's weight blocks, as the native kernels read them (shared with edgellm.quant)."""

from __future__ import annotations

import torch

GGML_BLOCK = 32
GGML_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "mxfp4": 17}
# llama.cpp's other 32-blocks, read from GGUF files as stored (edgellm does not quantize to them).
GGUF_ONLY_BLOCK_BYTES = {"q4_1": 20, "q5_0": 22, "q5_1": 24, "iq4_nl": 18}
# IQ4_NL's int8 level per 4-bit code, as gguf.quants.IQ4_NL.kvalues / ggml's kvalues_iq4nl.
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# llama.cpp's k-quants: 256-element super-blocks, read from GGUF files as stored (edgellm does not quantize to them).
QK_K = 256
KQUANT_BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
# E2M1 values doubled, indexed by the 4-bit code (sign bit 3), as gguf.quants.MXFP4.kvalues / ggml's kvalues_mxfp4.
MXFP4_LEVELS = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)

def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """2**(e - 128) as float32, ggml's ggml_e8m0_to_fp32_half (the doubled E2M1 levels take the other half)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    return bits.view(torch.float32)

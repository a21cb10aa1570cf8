"""Bytes per weight of every format the planner knows: the dense dtypes, edgellm's formats and GGUF's."""

from __future__ import annotations

from edgellm.errors import InvalidRequestError
from edgellm.layouts import QuantFormatError, WeightFormat

DENSE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STORE_DTYPE_BYTES = 2  # `edgellm quantize` keeps the unquantized tensors (embeddings, norms) in bf16


def bytes_per_weight(fmt: str) -> float:
    """Stored bytes per weight of a format (scales included): fp32/bf16/fp16, edgellm's formats and GGUF's."""
    if fmt in DENSE_BYTES:
        return DENSE_BYTES[fmt]
    try:
        return WeightFormat.gguf(fmt).bits_per_weight / 8
    except QuantFormatError as e:
        raise InvalidRequestError(f"{e}, or fp32, bf16, fp16") from None


def head_format(fmt: str) -> str:
    """The format of the output projection the loader runs beside projections in `fmt` (quant.linear.quantize_lm_head):
    a dense model's own, else Q8_0, or Q4_0 under 2-bit formats (WeightFormat.head)."""
    return fmt if fmt in DENSE_BYTES else WeightFormat.gguf(fmt).head


def check_format(fmt: str) -> str:
    """The canonical lower-case name of a weight format, or a one-line error."""
    key = fmt.strip().lower()
    bytes_per_weight(key)
    return key


def has_load_time_lut(fmt: str) -> bool:
    """True for the formats whose table-lookup copy (as many bytes as the weights) the loader makes up front."""
    return fmt not in DENSE_BYTES and WeightFormat.gguf(fmt).kind in ("affine", "ternary")

"""Quantized weights: formats (formats.py), QuantizedLinear and model swapping (linear.py), checkpoints (convert.py)."""

from edgellm.quant.formats import QuantFormatError, QuantizedTensor, UnpackedCodes, WeightFormat, format_names, quantize
from edgellm.quant.linear import QuantizedLinear, quantize_model

__all__ = ["QuantFormatError", "QuantizedLinear", "QuantizedTensor", "UnpackedCodes", "WeightFormat", "format_names",
           "quantize", "quantize_model"]

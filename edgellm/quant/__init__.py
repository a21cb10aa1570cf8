"""Quantized weights: formats (formats.py), QuantizedLinear and model swapping (linear.py), checkpoints (convert.py).

The exports load on first use, so a torch-free submodule (gguf_file.py: `edgellm plan` reading a GGUF's header)
does not import torch with its package.
"""

import importlib

_EXPORTS = {"QuantFormatError": "edgellm.quant.formats", "QuantizedTensor": "edgellm.quant.formats",
            "UnpackedCodes": "edgellm.quant.formats", "WeightFormat": "edgellm.quant.formats",
            "format_names": "edgellm.quant.formats", "quantize": "edgellm.quant.formats",
            "QuantizedLinear": "edgellm.quant.linear", "quantize_model": "edgellm.quant.linear"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value

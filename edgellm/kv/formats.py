"""KV cache formats by name ("fp16", "q8", "q4-kivi", "q4-kivi-h", ...): construction (parsing, metadata and sizes are
KVFormat's, in edgellm.layouts)."""

from __future__ import annotations

import torch
from torch import nn

from edgellm.errors import InvalidRequestError
from edgellm.kv.cache import DenseKVCache, KVCache
from edgellm.kv.quantized_cache import QuantizedKVCache
from edgellm.layouts import QUANTIZED, KVFormat  # the format itself is torch-free there, for the planner

DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dense_format(dtype: torch.dtype) -> KVFormat:
    """The dense format holding K/V exactly as a model of `dtype` computes them (the lossless default)."""
    kinds = {v: k for k, v in DENSE.items()}
    if dtype not in kinds:
        raise InvalidRequestError(f"no dense KV format for dtype {dtype}")
    return KVFormat(kinds[dtype])


def make_caches(model: nn.Module, fmt: KVFormat, capacity: int, batch: int = 1) -> list[KVCache]:
    """One contiguous cache per layer of `model` in format `fmt`, reserved for `capacity` tokens.

    Quantized caches keep their window and return K/V in the model's dtype; a dense cache holds `fmt`'s dtype.
    Paged caches come from a BlockPool instead (`pool.make_caches`), so formats need not know about pools.
    """
    args, dtype, device = model.args, model.dtype, model.device  # properties that search the model: asked once
    heads, head_dim = args.num_key_value_heads, args.head_dim
    if fmt.kind in DENSE:
        return [DenseKVCache(batch, heads, head_dim, capacity, DENSE[fmt.kind], device)
                for _ in range(args.num_hidden_layers)]
    return [QuantizedKVCache(batch, heads, head_dim, capacity, QUANTIZED[fmt.kind], fmt.group, fmt.scheme, fmt.window,
                             fmt.hadamard, dtype, device) for _ in range(args.num_hidden_layers)]

"""KV cache formats by name ("fp16", "q8", "q4-kivi", "q4-kivi-h", ...): parsing, metadata, sizes, construction."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import nn

from edgellm.errors import InvalidRequestError
from edgellm.kv.cache import DenseKVCache, KVCache
from edgellm.kv.quantized_cache import SCHEMES, QuantizedKVCache, bytes_per_token

DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED = {"q8": 8, "q4": 4, "q2": 2}
DEFAULT_GROUP = 64
DEFAULT_WINDOW = 64  # kivi: recent tokens kept in full precision, one key group by default
SYNTAX = ("fp32, bf16, fp16, or q8/q4/q2 followed by optional -token|-kivi (scheme), -h (Hadamard-rotated keys), "
          "-g<N> (group size), -w<N> (full-precision window), e.g. q4-kivi-h")


class ModelShape(Protocol):
    """The model hyper-parameters a cache size depends on (a ModelArgs)."""

    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int


@dataclass(frozen=True)
class KVFormat:
    """How a KV cache holds its tensors: dense in a float dtype, or quantized with a scheme.

    `window` defaults to DEFAULT_WINDOW for "kivi" (per-channel keys need a whole group of tokens before they
    can be quantized) and to 0 for "token".
    """

    kind: str
    scheme: str = "token"
    group: int = DEFAULT_GROUP
    window: int | None = None
    hadamard: bool = False

    def __post_init__(self) -> None:
        if self.window is None:
            object.__setattr__(self, "window", DEFAULT_WINDOW if self.scheme == "kivi" else 0)
        if self.kind not in DENSE and self.kind not in QUANTIZED:
            raise InvalidRequestError(f"unknown KV cache kind {self.kind!r}; expected {SYNTAX}")
        if self.scheme not in SCHEMES:
            raise InvalidRequestError(f"unknown KV scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
        if self.group < 1 or self.window < 0:
            raise InvalidRequestError(f"KV group must be >= 1 and window >= 0, got {self.group} and {self.window}")
        if self.kind in DENSE and (self.scheme != "token" or self.hadamard or self.window):
            raise InvalidRequestError(f"a dense {self.kind} KV cache takes no scheme, window or Hadamard option")

    @classmethod
    def parse(cls, text: str) -> KVFormat:
        """A format from its name: "q4", "q4-kivi", "q4-kivi-h", "q2-kivi-g32-w128", "fp16", ..."""
        kind, *options = text.strip().lower().split("-")
        scheme, hadamard, sizes = "token", False, {}
        for option in options:
            if option in SCHEMES:
                scheme = option
            elif option == "h":
                hadamard = True
            elif option[:1] in ("g", "w") and option[1:].isdigit():
                sizes[option[0]] = int(option[1:])
            else:
                raise InvalidRequestError(f"KV format {text!r}: unknown option {option!r}; expected {SYNTAX}")
        return cls(kind, scheme, sizes.get("g", DEFAULT_GROUP), sizes.get("w"), hadamard)

    def __str__(self) -> str:
        """The canonical name, which `parse` reads back."""
        if self.kind in DENSE:
            return self.kind
        default_window = DEFAULT_WINDOW if self.scheme == "kivi" else 0
        return "".join([self.kind, "-kivi" if self.scheme == "kivi" else "", "-h" if self.hadamard else "",
                        f"-g{self.group}" if self.group != DEFAULT_GROUP else "",
                        f"-w{self.window}" if self.window != default_window else ""])

    @property
    def quantized(self) -> bool:
        return self.kind in QUANTIZED

    def to_metadata(self) -> dict[str, str]:
        """String fields for a safetensors header, read back by `from_metadata`."""
        return {f"kv_{f.name}": str(getattr(self, f.name)).lower() for f in fields(self)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> KVFormat:
        """The format written by `to_metadata`; a missing or malformed field is an InvalidRequestError."""
        try:
            return cls(metadata["kv_kind"], metadata["kv_scheme"], int(metadata["kv_group"]),
                       int(metadata["kv_window"]), {"true": True, "false": False}[metadata["kv_hadamard"]])
        except (KeyError, ValueError) as e:
            raise InvalidRequestError(f"KV format metadata is missing or malformed ({e}): {metadata}") from None

    def bytes_per_token(self, args: ModelShape) -> float:
        """Exact bytes one token's K/V costs over all layers, scales and zeros included.

        The kivi full-precision window (window..window+group-1 tokens per layer) is a fixed cost on top.
        """
        heads, head_dim = args.num_key_value_heads, args.head_dim
        if self.kind in DENSE:
            per_layer = 2 * heads * head_dim * DENSE[self.kind].itemsize
        else:
            per_layer = bytes_per_token(heads, head_dim, QUANTIZED[self.kind], self.group, self.scheme)
        return args.num_hidden_layers * per_layer


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

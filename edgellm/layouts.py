"""What each weight and KV cache format stores, in bytes: names, bits, block and group sizes, bytes per weight and
per cached token. Pure arithmetic without torch, so `edgellm plan` can answer without importing it; quant.formats,
kv.formats and the kernels build on these and re-export them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Protocol

from edgellm.errors import EdgeLLMError, InvalidRequestError

if TYPE_CHECKING:
    import torch

GGML_BLOCK = 32
GGML_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "mxfp4": 17}
# llama.cpp's other 32-blocks, read from GGUF files as stored (edgellm does not quantize to them).
GGUF_ONLY_BLOCK_BYTES = {"q4_1": 20, "q5_0": 22, "q5_1": 24, "iq4_nl": 18}
# llama.cpp's k-quants: 256-element super-blocks, read from GGUF files as stored (edgellm does not quantize to them).
QK_K = 256
KQUANT_BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}


class QuantFormatError(EdgeLLMError):
    """An unknown weight format name, or a weight whose shape the format cannot store."""


GROUPS = (32, 64, 128)
GGUF_ONLY_BITS = {"q4_1": 4, "q5_0": 5, "q5_1": 5, "iq4_nl": 4}


def format_names() -> list[str]:
    """Every canonical format name, for error messages and CLI help."""
    names = ["q8_0", "q4_0", "mxfp4", "ternary", "ternary-g128"]
    names += [f"int{b}-g{g}" for b in (4, 3, 2) for g in GROUPS]
    return names


@dataclass(frozen=True)
class WeightFormat:
    """A weight format: `kind` is q8_0, q4_0, mxfp4 (fixed 32-blocks), affine or ternary (per-group scale/bias)."""

    name: str
    kind: str
    bits: int
    group: int

    @classmethod
    def parse(cls, name: str | WeightFormat) -> WeightFormat:
        """The format called `name` (case-insensitive), or a QuantFormatError listing the valid names."""
        if isinstance(name, WeightFormat):
            return name
        key = str(name).strip().lower()
        if key in GGML_BLOCK_BYTES:
            return cls(key, key, 8 if key == "q8_0" else 4, GGML_BLOCK)
        if key in ("ternary", "ternary-g64"):
            return cls("ternary", "ternary", 2, 64)
        if key == "ternary-g128":
            return cls(key, "ternary", 2, 128)
        m = re.fullmatch(r"int([234])-g(\d+)", key)
        if m and int(m[2]) in GROUPS:
            return cls(key, "affine", int(m[1]), int(m[2]))
        raise QuantFormatError(f"unknown weight format {name!r}; use one of {', '.join(format_names())}")

    @classmethod
    def gguf(cls, name: str) -> WeightFormat:
        """A block format a GGUF file can hold kept quantized: `parse`'s, plus q4_1, q5_0, q5_1, iq4_nl and the
        k-quants (q2_k..q6_k), which `parse` refuses because edgellm cannot quantize to them (its names are what
        `quantize` accepts)."""
        key = name.strip().lower()
        if key in KQUANT_BLOCK_BYTES:
            return cls(key, key, int(key[1]), QK_K)
        if key in GGUF_ONLY_BLOCK_BYTES:
            return cls(key, key, GGUF_ONLY_BITS[key], GGML_BLOCK)
        return cls.parse(key)

    @property
    def read_only(self) -> bool:
        """True for the GGUF block formats edgellm reads but does not quantize to."""
        return self.kind in GGUF_ONLY_BLOCK_BYTES or self.kind in KQUANT_BLOCK_BYTES

    @property
    def block_layout(self) -> bool:
        """True for the llama.cpp-style formats stored as one byte string of fixed-size blocks per row (of `group`
        weights each)."""
        return self.kind in GGML_BLOCK_BYTES or self.read_only

    @property
    def block_bytes(self) -> int:
        return {**GGML_BLOCK_BYTES, **GGUF_ONLY_BLOCK_BYTES, **KQUANT_BLOCK_BYTES}[self.kind]

    @property
    def bits_per_weight(self) -> float:
        """Storage cost including scales (and biases): q4_0 = 4.5, int4-g64 = 4.5, ternary = 2.5, q4_k = 4.5."""
        if self.block_layout:
            return self.block_bytes * 8 / self.group
        return self.bits + 32 / self.group

    @property
    def head(self) -> str:
        """The format the loader runs the output projection in beside projections in this one: Q8_0, as llama.cpp
        keeps heads at 6-8 bits, and Q4_0 under edgellm's 2-bit formats, where a Q8_0 head is half of a decode
        step's reads (Llama-3.2-1B shape, int2-g64: 279 of 556 MiB) for a quality gain the 2-bit body dwarfs
        (built-in model, int2-g64: perplexity 104.52 with a Q8_0 head, 104.94 with Q4_0, 103.45 in bf16; at 3
        bits a Q4_0 head would double int3-g128's KL, so it keeps Q8_0)."""
        return "q4_0" if self.kind in ("affine", "ternary") and self.bits <= 2 else "q8_0"

    def padded(self, k: int) -> int:
        """K rounded up to whole groups (block formats must already be whole blocks)."""
        return -(-k // self.group) * self.group

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise QuantFormatError(f"{self.name} stores 2-D weights [out, in], got shape {tuple(shape)}")
        if self.block_layout and shape[1] % self.group:
            raise QuantFormatError(f"{self.name} needs the input dimension to be a multiple of {self.group}, "
                                   f"got a weight of shape {tuple(shape)}; use an intN-gXX or ternary format")

    def data_shapes(self, n: int, k: int) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
        """Name → (shape, dtype) of each stored tensor for an [n, k] weight."""
        import torch  # here only: the rest of this module is read by the planner, which must not import torch

        self.check_shape((n, k))
        if self.block_layout:
            return {"blocks": ((n, k // self.group * self.block_bytes), torch.uint8)}
        kp, groups = self.padded(k), self.padded(k) // self.group
        return {"codes": ((n, kp * self.bits // 8), torch.uint8), "scales": ((n, groups), torch.float16),
                "biases": ((n, groups), torch.float16)}


SCHEMES = ("token", "kivi")
DENSE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # the dense KV kinds, bytes per element


def head_group(group: int, head_dim: int) -> int:
    """Group size used along head_dim: `group`, capped at head_dim so small heads still get one group each."""
    return min(group, head_dim)


def bytes_per_token(kv_heads: int, head_dim: int, bits: int, group: int, scheme: str = "token") -> float:
    """Bytes one quantized token costs in one layer, K and V: codes plus fp16 scale/zero pairs.

    Per-token groups hold head_dim/group pairs per token; per-channel ("kivi") keys hold head_dim pairs per
    `group` tokens, so per token the same when group <= head_dim. The full-precision window is not counted.
    """
    per_token_pairs = head_dim / head_group(group, head_dim)
    key_pairs = head_dim / group if scheme == "kivi" else per_token_pairs
    return kv_heads * (2 * head_dim * bits / 8 + 4 * (key_pairs + per_token_pairs))


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
        if self.kind not in DENSE_BYTES and self.kind not in QUANTIZED:
            raise InvalidRequestError(f"unknown KV cache kind {self.kind!r}; expected {SYNTAX}")
        if self.scheme not in SCHEMES:
            raise InvalidRequestError(f"unknown KV scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
        if self.group < 1 or self.window < 0:
            raise InvalidRequestError(f"KV group must be >= 1 and window >= 0, got {self.group} and {self.window}")
        if self.kind in DENSE_BYTES and (self.scheme != "token" or self.hadamard or self.window):
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
        if self.kind in DENSE_BYTES:
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
        if self.kind in DENSE_BYTES:
            per_layer = 2 * heads * head_dim * DENSE_BYTES[self.kind]
        else:
            per_layer = bytes_per_token(heads, head_dim, QUANTIZED[self.kind], self.group, self.scheme)
        return args.num_hidden_layers * per_layer

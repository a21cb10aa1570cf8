"""QuantizedLinear and quantize_model: swap a model's projections for quantized ones, keeping HF tensor names."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from edgellm.kernels.lut import LutWeight
from edgellm.kernels.select import choose_kernel
from edgellm.quant.formats import QuantizedTensor, WeightFormat, quantize
from edgellm.quant.qmatmul import prepare_lut, quantized_linear

LAZY_LUT = ("q4_0",)  # formats whose table-lookup copy is made on first use (see QuantizedLinear.prepare)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "gate_up_proj")  # gate_up_proj: gpt-oss experts, gate and up columns interleaved


class QuantizedLinear(nn.Module):
    """y = x @ W.T (+ bias) with W stored quantized; buffers are the format's tensors (`blocks` or `codes`,
    `scales`, `biases`), so state_dict names read e.g. `model.layers.0.self_attn.q_proj.codes`."""

    def __init__(self, in_features: int, out_features: int, fmt: str | WeightFormat, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        """Empty buffers of the right shapes (allocate on the meta device, then assign a state dict)."""
        super().__init__()
        self.fmt = WeightFormat.parse(fmt)
        self.in_features, self.out_features = in_features, out_features
        shapes = self.fmt.data_shapes(out_features, in_features)
        self.data_keys = tuple(shapes)
        for key, (shape, dtype) in shapes.items():
            self.register_buffer(key, torch.empty(shape, dtype=dtype))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype) if bias else None)
        self.lut: LutWeight | None = None  # the decode kernel's copy of the weight, made by prepare()
        self.lut_due = False  # Q4_0: the copy is made by the first call that runs the table-lookup kernel
        self.weight_view: QuantizedTensor | None = None  # the buffers as one QuantizedTensor, made by prepare()

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str | WeightFormat, method: str = "rtn") -> QuantizedLinear:
        """Quantize an existing linear layer's weight (its bias stays in its own dtype)."""
        qt = quantize(linear.weight.detach(), fmt, method)
        return cls.from_quantized(qt, None if linear.bias is None else linear.bias.detach())

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
        with torch.device("meta"):
            layer = cls(qt.shape[1], qt.shape[0], qt.fmt, bias is not None)
        for key in layer.data_keys:
            setattr(layer, key, qt.data[key])
        layer.bias = bias
        return layer

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor over this module's current buffers (cheap: no copies)."""
        return QuantizedTensor(self.fmt, (self.out_features, self.in_features),
                               {key: getattr(self, key) for key in self.data_keys})

    def prepare(self) -> None:
        """Repack the weight for the decode kernel and keep a view of the buffers for forward (the loader calls this
        once, so no request pays for it; call it again after replacing the buffers).

        Q4_0's blocks are read as stored by the int8 kernels (the fused decode step, prefill), so its table-lookup
        copy, as large again as the weight, waits for the first call with few enough rows to run that kernel (a
        small batch, a speculative check): a model decoded by the fused step never holds one."""
        self.weight_view = self.quantized
        self.lut_due = self.fmt.kind in LAZY_LUT
        self.lut = None if self.lut_due else prepare_lut(self.weight_view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_view is None:
            self.prepare()
        if self.lut_due and choose_kernel(self.fmt.bits, self.out_features, self.in_features,
                                          x.numel() // self.in_features) == "lut":
            self.lut, self.lut_due = prepare_lut(self.weight_view), False
        return quantized_linear(x, self.weight_view, self.bias, self.lut)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
                f"bias={self.bias is not None}")


def projection_names(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Module names of the attention/MLP projections, minus those matching a `skip` glob (e.g. '*.down_proj')."""
    skip = tuple(skip)
    return [name for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(module, nn.Linear)
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, fmt: str | WeightFormat, skip: Iterable[str] = (),
                   method: str = "rtn") -> list[str]:
    """Replace the q/k/v/o/gate/up/down projections by QuantizedLinear in place; embeddings, norms and lm_head
    stay as they are. Fused q/k/v and gate/up weights are dropped (quantized layers run unfused).
    Returns the names of the replaced modules."""
    fmt = WeightFormat.parse(fmt)
    names = projection_names(model, skip)
    for name in names:
        _set_module(model, name, QuantizedLinear.from_linear(model.get_submodule(name), fmt, method))
    unfuse(model)
    return names


def quantize_structure(model: nn.Module, fmt: str | WeightFormat, names: Iterable[str]) -> None:
    """Swap the named projections for empty QuantizedLinear layers (on the current device, e.g. meta) before a
    quantized checkpoint's state dict is assigned."""
    fmt = WeightFormat.parse(fmt)
    for name in names:
        linear = model.get_submodule(name)
        bias_dtype = linear.bias.dtype if linear.bias is not None else torch.float32
        _set_module(model, name, QuantizedLinear(linear.in_features, linear.out_features, fmt,
                                                 linear.bias is not None, bias_dtype))


def unfuse(model: nn.Module) -> None:
    """Forget fused q/k/v and gate/up weights of layers whose projections are no longer all plain linears."""
    for module in model.modules():
        for attr, parts in (("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj"))):
            if getattr(module, attr, None) is not None and not all(
                    isinstance(getattr(module, p), nn.Linear) for p in parts):
                setattr(module, attr, None)


class QuantizedEmbedding(nn.Module):
    """A token table kept in its stored blocks (a GGUF token_embd): a lookup dequantizes only the rows it gathers,
    into the model's dtype, and a tied head runs on the same blocks, as llama.cpp does. A float table would cost
    vocab x hidden x 2-4 bytes more than the file (113 MB in fp32 for 49K tokens at width 576)."""

    def __init__(self, qt: QuantizedTensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.fmt, self.dtype = qt.fmt, dtype
        self.num_embeddings, self.embedding_dim = qt.shape
        self.data_keys = tuple(qt.data)
        for key, value in qt.data.items():
            self.register_buffer(key, value)

    @property
    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.fmt, (self.num_embeddings, self.embedding_dim),
                               {key: getattr(self, key) for key in self.data_keys})

    @property
    def device(self) -> torch.device:
        return getattr(self, self.data_keys[0]).device

    def tied_head(self) -> QuantizedLinear:
        """The output projection over these very blocks (no copy); prepared with the others (or on first use)."""
        return QuantizedLinear.from_quantized(self.quantized)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = QuantizedTensor(self.fmt, (flat.numel(), self.embedding_dim),
                               {key: getattr(self, key).index_select(0, flat) for key in self.data_keys})
        return rows.dequantize(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}, dtype={self.dtype}"


def quantize_lm_head(model: nn.Module, fmt: str | WeightFormat | None = None) -> bool:
    """Run the output projection quantized when the decoder's projections are: in `fmt`, or else in the format their
    own format names (WeightFormat.head; Q8_0 where they differ).

    Kept in float it is the largest single read of a quantized model's decode step (vocab × hidden × 4 bytes in
    fp32: 134 MB per token for a 32K vocabulary at width 1024). The embedding keeps its float table for lookups,
    so a tied head stops sharing it. Returns whether the head was replaced."""
    head = getattr(model, "lm_head", None)
    heads = {m.fmt.head for m in model.modules() if isinstance(m, QuantizedLinear)}
    if not isinstance(head, nn.Linear) or not heads:
        return False
    fmt = WeightFormat.parse(fmt or (heads.pop() if len(heads) == 1 else "q8_0"))
    if head.in_features % fmt.group:
        return False
    model.lm_head = QuantizedLinear.from_linear(head, fmt)
    model.lm_head.prepare()
    model.lm_head.lut_due = False  # one row per prefill: Q4_0's int8 GEMV, not a table-lookup copy of the head
    return True


def prepare_quantized(model: nn.Module) -> None:
    """Repack every quantized projection for its decode kernel, at load time rather than in the first request."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare()

"""PEFT LoRA adapters kept unmerged: any number resident on one base model, chosen per batch row.

Each targeted projection is wrapped in a `LoraLinear`: the base (dense or quantized, untouched) runs once for the
whole batch, then the low-rank paths run for the whole batch too, each row through its own adapter (Punica's BGMV:
one native call gathers each row's slices, for all the projections of a fused q/k/v or gate/up output; see
`add_lora`). A projection keeps its adapters' tensors in one stack, in the model's dtype, so a resident adapter
costs its file's size (half that for an fp32 file on a bf16 model; different ranks on one projection pad to the
largest). Which adapter each row uses is set for one forward by `select`, as vLLM's LoRA metadata is: the model's
forward signature does not change.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from edgellm.checkpoint import read_json
from edgellm.errors import CheckpointError, InvalidRequestError
from edgellm.kernels import linear
from edgellm.kernels.kvattn import crc32
from edgellm.kernels.linear import lora_bgmv

# adapter_config.json keys whose non-default values change what the adapter computes in ways not implemented here
UNSUPPORTED = {"modules_to_save": None, "use_dora": False, "fan_in_fan_out": False, "layers_to_transform": None,
               "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
               "target_parameters": None, "trainable_token_indices": None, "megatron_config": None}
BGMV_MAX_TOKENS = 16  # tokens per row up to which the native gather kernel runs (decode, a speculative check)
KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraAdapter:
    """One adapter as read from disk: `pairs` maps a module name to its (A (r, in), B (out, r)); once the adapter is
    added to a model they move into its projections' stacks and `pairs` is emptied (`modules` stays)."""

    name: str
    path: Path
    rank: int
    scale: float
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    modules: list[str]
    nbytes: int
    fingerprint: str  # what the adapter computes (its weights, rank, scale), whatever it is named or where it lies


def _config(path: Path) -> dict:
    file = path / "adapter_config.json"
    config = read_json(file, "a PEFT LoRA adapter directory")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else config
        raise CheckpointError(f"{file}: peft_type {kind!r} is not supported; only LORA adapters load")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, [], False):
            raise CheckpointError(f"{file}: {key}={config[key]!r} is not supported; retrain the adapter without it")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: bias={config['bias']!r} is not supported; use bias=\"none\"")
    r, alpha = config.get("r"), config.get("lora_alpha")
    for key, value in (("r", r), ("lora_alpha", alpha)):
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
            raise CheckpointError(f"{file}: {key} must be a positive number, got {value!r}")
    if not isinstance(r, int):
        raise CheckpointError(f"{file}: r must be an integer, got {r!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise CheckpointError(f"{file}: target_modules must be a list of names or a regex, got {targets!r}")
    return config


def read_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), checked on its own."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"adapter directory {path} does not exist; pass a PEFT LoRA adapter directory")
    config = _config(path)
    file = path / "adapter_model.safetensors"
    if not file.exists():
        raise CheckpointError(f"no adapter_model.safetensors in {path}; save the adapter with safetensors")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is damaged or truncated ({e})") from e
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise CheckpointError(f"{file}: tensor {key} is not a LoRA A/B weight; only linear layers are supported")
        halves.setdefault(match[1], {})[match[2]] = tensor
    r, alpha = config["r"], config["lora_alpha"]
    pairs = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            raise CheckpointError(f"{file}: {module} has lora_{''.join(half)} but not both lora_A and lora_B")
        a, b = half["A"], half["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"{file}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, not rank r={r}")
        pairs[module] = (a, b)
    if not pairs:
        raise CheckpointError(f"{file} holds no LoRA weights")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    # the weights by name, shape and CRC32 (natively, at memory speed: hashing the file cost as much as loading it)
    digest = hashlib.sha256(f"r={r} scale={scale!r}".encode())  # rslora changes the scale, not the weights
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{key} {t.dtype} {tuple(t.shape)} {crc32(t.contiguous()):08x}\n".encode())
    return LoraAdapter(name or path.name, path, r, scale, pairs, list(pairs), nbytes, digest.hexdigest())


class LoraLinear(nn.Module):
    """A projection plus unmerged adapters: base(x) + scale · (x Aᵀ) Bᵀ, each batch row with its own adapter.

    The adapters' A are stacked as rows of one (n·r, in) matrix and their Bᵀ as rows of one (n·r, out), ranks padded
    to the largest. Decode (up to BGMV_MAX_TOKENS tokens per row) runs one native gather kernel in which each row
    reads only its own adapter's slices (`add_lora`); a prefill with one adapter for all rows runs that adapter's
    slices as GEMMs; otherwise (a mixed prefill, or no native build) two matmuls run over every resident adapter and
    the other adapters' paths are zeroed per row (`add_delta`)."""

    def __init__(self, base: nn.Module, adapters: Adapters) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = adapters  # the model's registry: which rows use which adapter in this forward
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # (A, B, scale): views into the stacks
        self.lora_a = self.lora_bt = torch.empty(0)
        self.rank = 0  # the padded rank of each slot in the stacks
        self.slots: dict[str, int] = {}
        # per batch: (rows, their slots and scales or None, whether one adapter serves every row)
        self.meta: tuple[tuple[str | None, ...], tuple[torch.Tensor, torch.Tensor] | None, bool] = ((), None, False)
        # add_lora's native call, where this is the first wrapped projection of a fused output: (rows, the
        # registry's version, lora_bgmv's arguments after x or None)
        self.merged: tuple[tuple[str | None, ...], int, tuple | None] = ((), -1, None)

    def set(self, name: str, pair: tuple[torch.Tensor, torch.Tensor, float] | None) -> None:
        """Add (A, B, scale) under `name`, or drop `name` with None, and restack (an added adapter that fits the
        padded rank is appended: one copy of the stacks, not one per resident adapter)."""
        items = {**self.lora, name: pair} if pair is not None else {k: v for k, v in self.lora.items() if k != name}
        appended = pair is not None and name not in self.lora and self.lora and pair[0].shape[0] <= self.rank
        self.lora, self.slots, self.meta = {}, {}, ((), None, False)
        if not items:
            return
        dtype = self.adapters.dtype  # the activations': fp32 adapters on a bf16 model are stored in bf16, as vLLM does
        if appended:
            r, (a, b, _) = self.rank, pair
            new_a = torch.zeros(r, self.in_features, dtype=dtype)
            new_bt = torch.zeros(r, self.out_features, dtype=dtype)
            new_a[:a.shape[0]], new_bt[:a.shape[0]] = a, b.t()
            self.lora_a, self.lora_bt = torch.cat([self.lora_a, new_a]), torch.cat([self.lora_bt, new_bt])
        else:
            self.rank = r = max(a.shape[0] for a, _, _ in items.values())
            self.lora_a = torch.zeros(len(items) * r, self.in_features, dtype=dtype)
            self.lora_bt = torch.zeros(len(items) * r, self.out_features, dtype=dtype)  # Bᵀ: rows read whole
            for i, (a, b, _) in enumerate(items.values()):
                self.lora_a[i * r:i * r + a.shape[0]], self.lora_bt[i * r:i * r + a.shape[0]] = a, b.t()
        for i, (key, (a, _, scale)) in enumerate(items.items()):
            rows = slice(i * r, i * r + a.shape[0])
            self.lora[key], self.slots[key] = (self.lora_a[rows], self.lora_bt[rows].t(), scale), i

    def row_slots(self, rows: tuple[str | None, ...]) -> tuple[list[int], list[float]] | None:
        """Each row's slot in the stacks (-1: none) and scale; None when no row's adapter targets this projection."""
        slots = [self.slots.get(name, -1) for name in rows]
        if max(slots) < 0:
            return None
        return slots, [self.lora[name][2] if slot >= 0 else 0.0 for name, slot in zip(rows, slots, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        add_lora(y, x, (self,))
        return y

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, rows: tuple[str | None, ...]) -> None:
        """Add each row's adapter path into y (B, T, out), this projection's output (or its columns of a fused
        q/k/v or gate/up output), in place, where add_lora's native call does not apply: a prefill, no native
        build, autograd."""
        if self.meta[0] != rows:  # the same batch step after step: built once
            found = self.row_slots(rows)
            tensors = None if found is None else (torch.tensor(found[0]), torch.tensor(found[1]))
            self.meta = (rows, tensors, len(set(rows)) == 1)
        _, found, single = self.meta
        if single and (x.shape[-2] > BGMV_MAX_TOKENS or x.shape[0] != len(rows)):
            # a prefill (or one adapter named for a whole batch): its slices as GEMMs
            if found is not None:
                a, b, scale = self.lora[rows[0]]
                y += linear(linear(x, a) * scale, b)
            return
        if found is None:
            return
        slots, scales = found
        x = x if x.dim() == 3 else x.reshape(len(rows), -1, self.in_features)
        # every resident adapter's path for every row, each zeroed but the row's own
        coef = torch.zeros(len(rows), len(self.slots), dtype=self.lora_a.dtype)
        hit = slots >= 0
        coef[hit.nonzero().flatten(), slots[hit]] = scales[hit].to(coef.dtype)
        h = linear(x, self.lora_a)
        h = (h.view(*h.shape[:2], -1, self.rank) * coef.view(len(rows), 1, -1, 1)).flatten(2)
        y += (h @ self.lora_bt).view(y.shape)


def add_lora(y: torch.Tensor, x: torch.Tensor, projections: tuple[nn.Module, ...]) -> None:
    """Add the adapter paths of the LoRA-wrapped ones among `projections` into their columns of y, their outputs side
    by side (q/k/v or gate/up keep one GEMV for the base when adapters are resident), in place.

    Decode runs one native call for all of them: x is read and converted once and the call's overhead is paid once,
    not per projection."""
    head = next((proj for proj in projections if isinstance(proj, LoraLinear)), None)
    if head is None:
        return
    registry = head.adapters
    rows = registry.rows
    if rows is None:
        return
    if head.merged[0] != rows or head.merged[1] != registry.version:  # the same batch step after step: built once
        head.merged = (rows, registry.version, _merged(projections, rows))
    args = head.merged[2]
    if args is None:
        return  # no row's adapter targets these projections
    if x.dim() == 3 and x.shape[0] == len(rows) and x.shape[1] <= BGMV_MAX_TOKENS and lora_bgmv(y, x, *args):
        return
    start = 0
    for proj in projections:
        if isinstance(proj, LoraLinear):
            proj.add_delta(y[..., start:start + proj.out_features], x, rows)
        start += proj.out_features


def _merged(projections: tuple[nn.Module, ...], rows: tuple[str | None, ...]) -> tuple | None:
    """lora_bgmv's arguments after x for the wrapped projections some row's adapter targets, or None if none."""
    a, bt, slots, scales, ranks, starts = [], [], [], [], [], []
    start = 0
    for proj in projections:
        found = proj.row_slots(rows) if isinstance(proj, LoraLinear) else None
        if found is not None:
            a.append(proj.lora_a), bt.append(proj.lora_bt), ranks.append(proj.rank), starts.append(start)
            slots.append(found[0]), scales.append(found[1])
        start += proj.out_features
    if not a:
        return None
    return a, bt, torch.tensor(slots, dtype=torch.long), torch.tensor(scales, dtype=torch.float32), ranks, starts


class Adapters:
    """The adapters resident on one model, by name, and (during a forward) the rows that use each of them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.loaded: dict[str, LoraAdapter] = {}
        self.dtype = model.dtype
        self.rows: tuple[str | None, ...] | None = None  # in a forward selecting adapters: each row's (None: base)
        self.version = 0  # bumped whenever projections' stacks change: add_lora's cached arguments are stale

    def add(self, adapter: LoraAdapter) -> None:
        """Wrap every projection the adapter targets (once), after checking the whole adapter fits this base."""
        if adapter.name in self.loaded:
            raise InvalidRequestError(f"adapter {adapter.name!r} is already loaded; unload it first")
        for module, (a, b) in adapter.pairs.items():
            target = _find(self.model, module, adapter)
            if (a.shape[1], b.shape[0]) != (target.in_features, target.out_features):
                raise CheckpointError(f"adapter {adapter.name} does not fit this model: {module} is "
                                      f"{target.out_features}x{target.in_features} but the adapter's A/B give "
                                      f"{b.shape[0]}x{a.shape[1]}; it was trained on another base model")
        for module, (a, b) in adapter.pairs.items():
            wrapped = self.model.get_submodule(module)
            if not isinstance(wrapped, LoraLinear):
                wrapped = LoraLinear(wrapped, self)
                parent, _, child = module.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped)
            wrapped.set(adapter.name, (a, b, adapter.scale))
        adapter.pairs = {}  # held once, in the stacks
        self.loaded[adapter.name] = adapter
        self.version += 1

    def remove(self, name: str) -> None:
        """Drop an adapter; projections no other adapter uses get their plain base back."""
        self.check(name)
        for module in self.loaded.pop(name).modules:
            wrapped = self.model.get_submodule(module)
            wrapped.set(name, None)
            if not wrapped.lora:
                parent, _, child = module.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped.base)
        self.version += 1

    @property
    def nbytes(self) -> int:
        """Bytes the resident adapters hold: their projections' stacks."""
        return sum(m.lora_a.nbytes + m.lora_bt.nbytes for m in self.model.modules() if isinstance(m, LoraLinear))

    def check(self, name: str) -> None:
        if name not in self.loaded:
            known = ", ".join(sorted(self.loaded)) or "none"
            raise InvalidRequestError(f"unknown adapter {name!r}; loaded adapters: {known}")

    @contextmanager
    def use(self, rows: list[str | None]) -> Iterator[None]:
        """Within the block, batch row i uses adapter rows[i] (None: the base alone)."""
        for name in set(rows) - {None}:
            self.check(name)
        self.rows = tuple(rows) if any(name is not None for name in rows) else None
        try:
            yield
        finally:
            self.rows = None


def _find(model: nn.Module, module: str, adapter: LoraAdapter) -> nn.Module:
    """The projection `module` names in `model`, or why the adapter does not fit this base."""
    if ".experts." in f"{module}.":  # an expert sees only the tokens routed to it, not the batch's rows
        raise CheckpointError(f"adapter {adapter.name}: {module} is a MoE expert; LoRA on experts is not supported")
    try:
        target = model.get_submodule(module)
    except AttributeError:
        raise CheckpointError(f"adapter {adapter.name} does not fit this model: it has no module {module}; "
                              "the adapter was trained on another base model") from None
    target = target.base if isinstance(target, LoraLinear) else target
    if not hasattr(target, "in_features") or not hasattr(target, "out_features"):
        raise CheckpointError(f"adapter {adapter.name}: {module} is a {type(target).__name__}, not a linear layer")
    return target


def adapters(model: nn.Module) -> Adapters:
    """The model's adapter registry, made on first use."""
    registry = model.__dict__.get("adapters")
    if registry is None:
        registry = model.__dict__["adapters"] = Adapters(model)
    return registry


def resident(model: nn.Module) -> dict[str, LoraAdapter]:
    """The adapters loaded on `model` by name (a copy; empty when none ever was)."""
    registry = model.__dict__.get("adapters")
    return {} if registry is None else dict(registry.loaded)


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter and make it resident on `model` under `name` (default: the directory's name)."""
    adapter = read_adapter(path, name)
    adapters(model).add(adapter)
    return adapter


def select(model: nn.Module, rows: list[str | None]) -> AbstractContextManager[None]:
    """Run the next forward with adapter rows[i] on batch row i; free when no row names one."""
    if all(r is None for r in rows) and "adapters" not in model.__dict__:
        return nullcontext()
    return adapters(model).use(rows)

"""`edgellm quantize`: write a quantized copy of a HF checkpoint that `edgellm.load` opens like any other."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgellm.checkpoint import quant_format, read_config
from edgellm.errors import CheckpointError
from edgellm.loader import read_weights, resolve_dtype
from edgellm.models import family_for
from edgellm.quant.formats import QuantFormatError, WeightFormat, check_method, quantize
from edgellm.quant.linear import PROJECTIONS

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass
class ConvertReport:
    """What `quantize_checkpoint` wrote, for the CLI's summary line."""

    out_dir: Path
    format: str
    bits_per_weight: float
    quantized_tensors: int
    input_bytes: int
    output_bytes: int
    seconds: float


def is_projection(name: str, tensor: torch.Tensor) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS and tensor.dim() == 2


def _check_out_dir(in_dir: Path, out_dir: Path, force: bool) -> None:
    if out_dir.resolve() == in_dir.resolve():
        raise CheckpointError(f"output directory {out_dir} is the input directory; choose another OUT_DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CheckpointError(f"output directory {out_dir} is not empty; pass --force to replace it")


def quantize_checkpoint(in_dir: str | Path, out_dir: str | Path, fmt: str | WeightFormat, dtype: str = "bf16",
                        force: bool = False, method: str = "rtn") -> ConvertReport:
    """Quantize every q/k/v/o/gate/up/down projection (each MoE expert's too) to `fmt` (see `quantize` for
    `method`), store the other tensors in `dtype`, copy the tokenizer and generation files; written to a temp dir and
    renamed, so a failure leaves OUT_DIR untouched."""
    start = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    fmt = WeightFormat.parse(fmt)
    check_method(fmt, method)
    config = read_config(in_dir)
    family = family_for(config)  # an unsupported architecture fails here, before any work
    if (stored := quant_format(config, in_dir)) is not None:
        raise CheckpointError(f"{in_dir} is already quantized ({stored.name}); quantize the full-precision "
                              "checkpoint instead")
    _check_out_dir(in_dir, out_dir, force)
    store_dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = family.Model(family.ModelArgs.from_config(config))
    weights = model.sanitize(read_weights(in_dir))  # edgellm's names: Mixtral's w1/w2/w3 experts are projections too
    names = [n for n, t in weights.items() if is_projection(n, t)]
    if not names:
        raise CheckpointError(f"{in_dir} has no q/k/v/o/gate/up/down projection weights to quantize")
    for name in names:  # fail on the first bad shape before quantizing anything
        try:
            fmt.check_shape(tuple(weights[name].shape))
        except QuantFormatError as e:
            raise QuantFormatError(f"{name}: {e}") from e
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name in names:
            module = name.removesuffix(".weight")
            for key, t in quantize(tensor, fmt, method).data.items():
                out[f"{module}.{key}"] = t.contiguous()
        elif "rotary_emb.inv_freq" not in name:
            out[name] = tensor.to(store_dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    qc = {"quant_method": "edgellm", "format": fmt.name, "bits_per_weight": fmt.bits_per_weight,
          "group_size": fmt.group, "method": method, "modules": sorted({n.split(".")[-2] for n in names})}
    config = {**config, "quantization_config": qc, "torch_dtype": str(store_dtype).removeprefix("torch.")}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(out, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "edgellm_quant_format": fmt.name, "edgellm_quant": json.dumps(qc)})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for file in in_dir.iterdir():
            if file.is_file() and file.name != "config.json" and not file.name.endswith(WEIGHT_SUFFIXES) \
                    and file.name != "model.safetensors.index.json":
                shutil.copy2(file, tmp / file.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertReport(out_dir, fmt.name, fmt.bits_per_weight, len(names),
                         sum(t.numel() * t.element_size() for t in weights.values()),
                         (out_dir / "model.safetensors").stat().st_size, time.perf_counter() - start)

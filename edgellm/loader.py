"""Load a Hugging Face checkpoint directory: config.json + (sharded) safetensors, memory-mapped."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from edgellm.checkpoint import mxfp4_release, quant_format, read_config
from edgellm.errors import CheckpointError
from edgellm.kernels.runtime import resolve_dtype, warm_kernels
from edgellm.models import family_for
from edgellm.quant.gguf_read import load_gguf
from edgellm.quant.linear import (
    QuantizedLinear,
    prepare_quantized,
    projection_names,
    quantize_lm_head,
    quantize_structure,
)
from edgellm.tokenizer import Tokenizer


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}; convert .bin checkpoints to safetensors first")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"weight shard(s) missing from {path}: {', '.join(missing)}")
    return files


def checkpoint_fingerprint(path: Path, samples: int = 32, sample_bytes: int = 4096) -> str:
    """Hash of config.json, every safetensors header and evenly spaced samples of the weight bytes.

    A saved KV cache is only valid for the exact model that produced it. Headers alone cannot tell a fine-tune
    from its base (same names and shapes), so weight bytes are sampled too; reading ~128 KiB per file keeps
    this cheap for multi-GB checkpoints.
    """
    h = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(head + f.read(min(n, 100_000_000)))
            start = 8 + n
            for i in range(samples):
                f.seek(start + (size - start) * i // samples)
                h.update(f.read(sample_bytes))
    return h.hexdigest()[:32]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, memory-mapped from disk (no copy until a dtype change needs one)."""
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    weights[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file} is damaged or truncated ({e}); re-download or re-save it") from e
    return weights


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Build the model on the meta device and assign the checkpoint's tensors to it."""
    path = Path(path)
    config = read_config(path)
    family = family_for(config)
    args = family.ModelArgs.from_config(config)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = family.Model(args)
    fmt = quant_format(config, path)
    weights = model.sanitize(read_weights(path))
    if fmt is not None:  # a projection stored without `.weight` holds the format's tensors instead
        quantize_structure(model, fmt, [n for n in projection_names(model) if f"{n}.weight" not in weights])
    expected = dict(model.state_dict())
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the weights, e.g. {missing[0]}; "
                              "the checkpoint does not match config.json")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), e.g. {extra[0]}; "
                              "the checkpoint does not match config.json")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                                  f"{tuple(expected[name].shape)}")
    stored = {f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
              for key in m.data_keys}
    for name in stored:
        if weights[name].dtype != expected[name].dtype:
            raise CheckpointError(f"{path}: tensor {name} has dtype {weights[name].dtype} but format {fmt.name} "
                                  f"stores {expected[name].dtype}")
    # Fused q/k/v and gate/up are copies: free where loading converts the weights anyway, but ~0.6x the file of
    # private memory beside the mapped checkpoint where it does not (the native decode step reads the projections
    # apart at the same speed: 250M bf16, 1 thread, RSS 928 -> 696 MB, decode and batched decode unchanged).
    mapped = torch.device(device).type == "cpu" and any(v.dtype == dtype for k, v in weights.items() if k not in stored)
    weights = {k: v.to(device=device, dtype=v.dtype if k in stored else dtype) for k, v in weights.items()}
    model.load_state_dict(weights, assign=True, strict=False)
    model.tie_weights()
    if not mapped:
        model.fuse()
    prepare_quantized(model)
    if not mxfp4_release(config):  # the release's head is bf16 by its authors' choice (and transformers runs it so)
        quantize_lm_head(model)
    model.rope.inv_freq = model.rope.inv_freq.to(device)
    model.name = path.name
    model.path = path
    model.fingerprint = checkpoint_fingerprint(path)
    warm_kernels(dtype, device)
    return model.eval().requires_grad_(False)


def load(path: str | Path | None = None, dtype: str | torch.dtype | None = None,
         device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """Model and tokenizer from a HF directory or a .gguf file; with no path, edgellm's built-in default model."""
    if path is None:
        from edgellm.assets import default_model_path
        path = default_model_path()
    if str(path).lower().endswith(".gguf"):
        return load_gguf(path, dtype, device)
    return load_model(path, dtype, device), Tokenizer(path)

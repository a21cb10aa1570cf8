"""What a checkpoint is and what it costs in memory, read from config.json and the safetensors headers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from edgellm.checkpoint import quant_format, read_config
from edgellm.errors import CheckpointError
from edgellm.loader import weight_files
from edgellm.models import family_for


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def model_info(path: str | Path | None) -> dict:
    """Architecture, parameter count, memory per dtype and KV bytes per token, without loading weights."""
    if path is None:
        from edgellm.assets import default_model_path
        path = default_model_path()
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return _gguf_info(path)
    config = read_config(path)
    family = family_for(config)
    args = family.ModelArgs.from_config(config)
    fmt = quant_format(config, path)
    if fmt is not None:
        with torch.device("meta"):
            meta = family.Model(args)
    params = 0
    files = weight_files(path)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    module, _, key = name.rpartition(".")
                    if fmt is not None and key in ("blocks", "codes"):  # count the weights a quantized one stands for
                        params += meta.get_submodule(module).weight.numel()
                    elif fmt is not None and key.endswith("_proj_blocks"):  # gpt-oss MXFP4 release: 2 codes a byte
                        params += 2 * _numel(f.get_slice(name).get_shape())
                    elif fmt is None or not (key in ("scales", "biases") or key.endswith("_proj_scales")):
                        params += _numel(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:  # the damage load() reports the same way
            raise CheckpointError(f"{file} is damaged or truncated ({e}); re-download or re-save it") from e
    stored = ({"quantization": f"{fmt.name} ({fmt.bits_per_weight} bits/weight)",
               "file_size": _gib(sum(f.stat().st_size for f in files))} if fmt is not None else {})
    return _summary(path, (config.get("architectures") or ["?"])[0], args, params, stored)


def _summary(path: Path, architecture: str, args, params: int, stored: dict) -> dict:
    """The fields every checkpoint kind shares; `stored` says how its weights are held on disk."""
    kv_per_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim
    return {
        "path": str(path),
        "architecture": architecture,
        "model_type": args.model_type,
        "parameters": params,
        "layers": args.num_hidden_layers,
        "hidden_size": args.hidden_size,
        "heads": f"{args.num_attention_heads} q / {args.num_key_value_heads} kv, head_dim {args.head_dim}",
        "vocab_size": args.vocab_size,
        "context": args.max_position_embeddings,
        "rope": (args.rope_scaling or {}).get("rope_type", (args.rope_scaling or {}).get("type", "default")),
        "tied_embeddings": args.tie_word_embeddings,
        **stored,
        "memory_fp32": _gib(params * 4),
        "memory_bf16": _gib(params * 2),
        "memory_fp16": _gib(params * 2),
        "kv_bytes_per_token_fp16": kv_per_token * 2,
        "kv_bytes_per_token_fp32": kv_per_token * 4,
        "kv_at_full_context_fp16": _gib(kv_per_token * 2 * args.max_position_embeddings),
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _gguf_info(path: Path) -> dict:
    """The same summary for a GGUF file, from its header: tensor types instead of a weight format."""
    from collections import Counter

    from edgellm.quant.gguf_file import gguf_config, open_gguf

    reader = open_gguf(path)
    config = gguf_config(reader, path)
    args = family_for(config).ModelArgs.from_config(config)
    params = sum(_numel(t.shape) for t in reader.tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return _summary(path, config["architectures"][0] + " (GGUF)", args, params,
                    {"tensor_types": ", ".join(f"{n} x{c}" for n, c in types.most_common()),
                     "file_size": _gib(path.stat().st_size)})

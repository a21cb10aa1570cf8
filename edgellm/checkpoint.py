"""What a checkpoint directory holds, read without torch: its config.json and its weight format (`edgellm plan`
reads models this way and answers without importing torch)."""

from __future__ import annotations

import json
from pathlib import Path

from edgellm.errors import CheckpointError
from edgellm.layouts import QuantFormatError, WeightFormat


def read_json(file: Path, what: str) -> object:
    """The JSON in `file`; CheckpointError naming `what` the directory should be when it is missing or not JSON."""
    if not file.exists():
        raise CheckpointError(f"no {file.name} in {file.parent}; pass {what}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from e


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist; pass a Hugging Face model directory")
    file = path / "config.json"
    config = read_json(file, "a Hugging Face model directory")
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object of hyper-parameters, not a {type(config).__name__}")
    return config


def mxfp4_release(config: dict) -> bool:
    """True for OpenAI's gpt-oss release layout: experts as MXFP4 blocks + scales, everything else as stored."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "mxfp4"


def quant_format(config: dict, path: Path) -> WeightFormat | None:
    """The weight format of an `edgellm quantize` checkpoint or gpt-oss's MXFP4 release, None for a full-precision
    one."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if mxfp4_release(config):
        if config.get("model_type") != "gpt_oss":
            raise CheckpointError(f"{path}: quantization method 'mxfp4' is supported for gpt-oss checkpoints only, "
                                  f"not model_type {config.get('model_type')!r}")
        return WeightFormat.parse("mxfp4")
    if not isinstance(qc, dict) or qc.get("quant_method") != "edgellm":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"{path}: quantization method {method!r} is not supported; load the full-precision "
                              "model, or quantize it with `edgellm quantize`")
    try:
        return WeightFormat.parse(qc.get("format", ""))
    except QuantFormatError as e:
        raise CheckpointError(f"{path}: config.json quantization_config: {e}") from e

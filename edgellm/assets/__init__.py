"""edgellm's built-in default model, shipped inside the package because nothing can be downloaded at runtime."""

from __future__ import annotations

from pathlib import Path

from edgellm.errors import CheckpointError

DEFAULT_MODEL_DIR = Path(__file__).parent / "default-model"


def default_model_path() -> Path:
    """The directory of the built-in HF-format model, checked to hold its config and weights."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file() or not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise CheckpointError(f"the built-in model is missing from {DEFAULT_MODEL_DIR}; build it with "
                              f"`edgellm train --preset default --out runs/default` and copy its files there")
    return DEFAULT_MODEL_DIR

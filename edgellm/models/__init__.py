"""Model families by HF architecture name: one short file per family."""

from __future__ import annotations

from types import ModuleType

from edgellm.errors import CheckpointError, UnsupportedModelError
from edgellm.models import gpt_oss, llama, moe

ARCHITECTURES: dict[str, ModuleType] = {
    "GptOssForCausalLM": gpt_oss,
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,
    "MixtralForCausalLM": moe,
    "OlmoeForCausalLM": moe,
    "Qwen2ForCausalLM": llama,
    "Qwen2MoeForCausalLM": moe,
    "Qwen3ForCausalLM": llama,
    "Qwen3MoeForCausalLM": moe,
}


def family_for(config: dict) -> ModuleType:
    """The module implementing the checkpoint's architecture, or a one-line error listing what is supported."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"config.json: architectures must be a list of names, e.g. [\"LlamaForCausalLM\"], "
                              f"got {archs!r}")
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise UnsupportedModelError(
        f"architecture {', '.join(archs) or '(none given)'} is not supported; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}")

"""edgellm: an on-device LLM inference engine."""

import importlib
import sys
from types import ModuleType

__version__ = "0.1.0"
_EXPORTS = {"generate": "edgellm.generate", "stream_generate": "edgellm.generate", "load": "edgellm.loader",
            "PromptCache": "edgellm.kv.prompt_cache", "SamplingParams": "edgellm.sampling"}
__all__ = sorted(_EXPORTS)


class _Package(ModuleType):
    """Exports imported on first use, so commands that need no model (`edgellm plan`) never import torch."""

    def __getattr__(self, name: str):
        if name not in _EXPORTS:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        setattr(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # importing the submodule edgellm.generate binds it here: `edgellm.generate` stays the function
        if name in _EXPORTS and isinstance(value, ModuleType) and value.__name__ == _EXPORTS[name]:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

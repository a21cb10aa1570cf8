"""edgellm: an on-device LLM inference engine."""

from edgellm.generate import generate, stream_generate
from edgellm.kv.prompt_cache import PromptCache
from edgellm.loader import load
from edgellm.sampling import SamplingParams

__all__ = ["PromptCache", "SamplingParams", "generate", "load", "stream_generate"]
__version__ = "0.1.0"

"""A cache that remembers which token ids it holds, so a new prompt only prefills what is new."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from edgellm.kv.cache import KVCache

if TYPE_CHECKING:
    from edgellm.kv.formats import KVFormat


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """Per-layer KV caches plus the exact token ids whose K/V they hold."""

    def __init__(self, model: nn.Module, capacity: int = 256, kv_format: KVFormat | None = None) -> None:
        self.kv_format = kv_format
        self.layers: list[KVCache] = model.make_cache(capacity, kv_format=kv_format)
        self.tokens: list[int] = []

    def reuse(self, prompt: list[int]) -> int:
        """Keep the longest cached prefix of `prompt` (never all of it: the last token must run to give logits).

        Identical prompt → all but the last token; extension → all cached tokens; divergence → the common prefix.
        Returns how many prompt tokens are already cached.
        """
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        drop = len(self.tokens) - keep
        if drop:
            for layer in self.layers:
                layer.trim(drop)
            del self.tokens[keep:]
        return keep

"""KV cache kinds (dense now; quantized, paged and persisted kinds plug into the same interface)."""

from edgellm.kv.cache import DenseKVCache, KVCache

__all__ = ["DenseKVCache", "KVCache"]

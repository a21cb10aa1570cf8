"""KV cache kinds behind one interface: dense, quantized (token / KIVI schemes), paged from a block pool, formats."""

from edgellm.kv.batch import SequenceBatch, batch_layers
from edgellm.kv.cache import AttentionCache, DenseKVCache, KVCache, causal_mask
from edgellm.kv.codec import QuantizedTensor, dequantize, hadamard, quantize
from edgellm.kv.formats import KVFormat, make_caches
from edgellm.kv.pool import BlockPool, PagedKVCache, PoolExhausted
from edgellm.kv.quantized_cache import QuantizedKVCache

__all__ = ["AttentionCache", "BlockPool", "DenseKVCache", "KVCache", "KVFormat", "PagedKVCache", "PoolExhausted",
           "QuantizedKVCache", "QuantizedTensor", "SequenceBatch", "batch_layers", "causal_mask", "dequantize",
           "hadamard", "make_caches", "quantize"]

"""A cache that remembers which token ids it holds, so a new prompt only prefills what is new."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgellm.errors import InvalidRequestError
from edgellm.kv.cache import BlockTarget, KVCache, Layout
from edgellm.kv.pool import BlockPool, PoolExhausted, block_key

if TYPE_CHECKING:
    from edgellm.kv.formats import KVFormat


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """Per-layer KV caches plus the exact token ids whose K/V they hold.

    With a `pool`, the layers are paged caches drawing blocks from it (format: the pool's), which can be forked.
    """

    def __init__(self, model: nn.Module, capacity: int = 256, kv_format: KVFormat | None = None,
                 pool: BlockPool | None = None) -> None:
        if pool is not None and kv_format not in (None, pool.fmt):
            raise InvalidRequestError(f"a {pool.fmt} block pool gives batch-1 {pool.fmt} caches, not batch-1 "
                                      f"{kv_format} ones")
        self.kv_format, self.pool = (pool.fmt, pool) if pool is not None else (kv_format, None)
        self.layers: list[KVCache] = (pool.make_caches(model.args.num_hidden_layers) if pool is not None
                                      else model.make_cache(capacity, kv_format=kv_format))
        self.tokens: list[int] = []

    def receive(self, states: list[dict[str, torch.Tensor | Layout]]) -> list[dict[str, torch.Tensor | BlockTarget]]:
        """Room for a saved `state()` per layer, held from now on; where each entry goes, for a restore to read a
        memory file straight into (see `ContiguousCache.receive`; a paged cache's layers take all their blocks at
        once, or none: PoolExhausted). A cache kind with a `receive_all` checks alike layers once."""
        receive_all = getattr(type(self.layers[0]), "receive_all", None) if self.layers else None
        if receive_all is not None:
            return receive_all(self.layers, states)
        return [layer.receive(state) for layer, state in zip(self.layers, states, strict=True)]

    def reuse(self, prompt: list[int]) -> int:
        """Keep the longest cached prefix of `prompt` (never all of it: the last token must run to give logits).

        Identical prompt → all but the last token; extension → all cached tokens; divergence → the common prefix.
        Returns how many prompt tokens are already cached.
        """
        keep = max(0, min(common_prefix(self.tokens, prompt), len(prompt) - 1))
        for layer in self.layers:  # trim to an absolute position: layers stay aligned even after a failed step
            if layer.offset > keep:
                layer.trim(layer.offset - keep)
        del self.tokens[keep:]
        return keep

    def fork(self, prompt: list[int] | None = None) -> PromptCache:
        """A paged cache sharing this one's blocks for the common prefix with `prompt` (all tokens when None).

        A second agent starting with the same system prompt forks instead of prefilling it again; shared blocks
        are copied only when one side writes into them.
        """
        if self.pool is None:
            raise InvalidRequestError("only a cache drawn from a block pool can be forked")
        keep = len(self.tokens) if prompt is None else max(0, min(common_prefix(self.tokens, prompt), len(prompt) - 1))
        child = copy.copy(self)
        child.layers = [layer.fork(keep) for layer in self.layers]
        child.tokens = self.tokens[:keep]
        return child

    def publish(self) -> None:
        """Offer this paged cache's full blocks to caches that start with the same tokens (prefix sharing).

        Only K/V computed from the tokens themselves may be published: never a KV predictor's.
        """
        if self.pool is None:
            return
        key, bt = b"", self.pool.block_tokens
        for i in range(min(len(self.tokens), self.layers[0].offset) // bt):
            key = block_key(key, self.tokens[i * bt:(i + 1) * bt])
            self.pool.publish(key, [layer.table[i] for layer in self.layers])

    def adopt(self, prompt: list[int], limit: int | None = None) -> int:
        """Take over the published blocks that hold more of `prompt`'s leading tokens than this cache does (up to
        `limit`, by default all but the last token, which must run); returns the tokens held afterwards.

        Call after `reuse`: what the cache holds is a prefix of `prompt`, so its whole blocks are kept.
        """
        held = len(self.tokens)
        if self.pool is None:
            return held
        bt = self.pool.block_tokens
        found = self.pool.lookup(prompt, len(prompt) - 1 if limit is None else limit)
        if len(found) * bt <= held:
            return held
        own = held // bt
        for layer in self.layers:  # back to its last whole block, reservations dropped: adopted blocks follow it
            layer.trim(layer.offset - own * bt)
        for li, layer in enumerate(self.layers):
            layer.adopt([blocks[li] for blocks in found[own:]])
        self.tokens = list(prompt[:len(found) * bt])
        return len(self.tokens)

    @property
    def private_blocks(self) -> int:
        """Pool blocks only this cache holds: what dropping it frees."""
        return sum(layer.private_blocks() for layer in self.layers) if self.pool is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the layers (reservations included; a shared block counts in every cache holding it)."""
        return sum(layer.nbytes for layer in self.layers)

    def reserve(self, tokens: int) -> None:
        """Take every pool block that holding `tokens` tokens needs in every layer, or none (PoolExhausted)."""
        if self.pool is None:
            return
        needed = sum(layer.blocks_needed(tokens) for layer in self.layers)
        if needed > self.pool.free_blocks:
            raise PoolExhausted(f"KV pool exhausted: {needed} blocks wanted for {tokens} tokens, "
                                f"{self.pool.free_blocks} of {self.pool.capacity_blocks} free")
        for layer in self.layers:
            layer.reserve(tokens)

    def trim_reservation(self) -> None:
        """Give back pool blocks reserved past the tokens actually held (generation may stop early)."""
        if self.pool is not None:
            for layer in self.layers:
                layer.trim(0)

    def share_published(self) -> None:
        """Hold the published blocks of this paged cache's leading full blocks instead of private copies (a restored
        agent whose system prompt other agents share keeps one physical copy of it); no-op without a pool."""
        if self.pool is None:
            return
        found = self.pool.lookup(self.tokens, min(len(self.tokens), self.layers[0].offset))
        for i, layer in enumerate(self.layers):
            layer.share_published([blocks[i] for blocks in found])

    def release(self) -> None:
        """Give a paged cache's blocks back to its pool (the cache is empty afterwards); no-op otherwise."""
        if self.pool is not None:
            for layer in self.layers:
                layer.release()
            self.tokens.clear()

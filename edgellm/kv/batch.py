"""Several sequences' own caches seen as one batch, so their decode steps share one forward pass.

Linear layers (where decode spends its time reading weights) run once for the whole batch; attention runs per
sequence over that sequence's own cache, whatever its kind or length. Nothing is padded or copied, and each
agent's cache stays its own (it can be saved, restored or evicted between steps).
"""

from __future__ import annotations

import torch

from edgellm.kv.cache import KVCache, causal_mask


class SequenceBatch:
    """One layer's view over B independent caches; `offsets` gives each sequence's position."""

    def __init__(self, caches: list[KVCache], window: int | None = None) -> None:
        self.caches = caches
        self.window = window

    @property
    def offsets(self) -> list[int]:
        return [c.offset for c in self.caches]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Store row i's new K/V in cache i and attend over it; rows are (1, heads, t, head_dim) each.

        `mask` is ignored: each row is masked at its own position."""
        out = []
        for i, cache in enumerate(self.caches):
            qi, ki, vi = q[i:i + 1], k[i:i + 1], v[i:i + 1]
            row_mask = causal_mask(cache.offset, q.shape[2], self.window, q.device)
            out.append(cache.attend(qi, ki, vi, row_mask, scale))
        return torch.cat(out)


def batch_layers(per_sequence: list[list[KVCache]], window: int | None = None) -> list[SequenceBatch]:
    """Regroup [sequence][layer] caches into one SequenceBatch per layer."""
    return [SequenceBatch(list(layer), window) for layer in zip(*per_sequence, strict=True)]

"""Rotary position embeddings with the scalings HF checkpoints use (default, linear, dynamic NTK, llama3, YaRN)."""

from __future__ import annotations

import math

import torch

from edgellm.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_kind(rope_scaling: dict | None) -> str:
    """Normalise the checkpoint's `rope_scaling` to one of ROPE_TYPES, rejecting the rest by name."""
    if not rope_scaling:
        return "default"
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return kind


class RotaryEmbedding:
    """Computes cos/sin tables for given positions; the inverse frequencies follow transformers exactly."""

    def __init__(self, head_dim: int, base: float, max_position: int, rope_scaling: dict | None) -> None:
        self.dim = head_dim
        self.base = base
        self.max_position = max_position
        self.scaling = rope_scaling or {}
        self.kind = rope_kind(rope_scaling)
        self.inv_freq = self._inv_freq(base)
        self.attention_scaling = 1.0  # YaRN scales cos/sin (so q·k) by its mscale
        self._twice: torch.Tensor | None = None  # inv_freq twice over (cos_sin_at), made on first use
        if self.kind == "linear":
            self.inv_freq = self.inv_freq / float(self.scaling["factor"])
        elif self.kind == "llama3":
            self.inv_freq = self._llama3(self.inv_freq)
        elif self.kind == "yarn":
            self.inv_freq, self.attention_scaling = self._yarn()

    def _inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim))

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        s = self.scaling
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def _yarn(self) -> tuple[torch.Tensor, float]:
        """YaRN (arXiv 2309.00071) as transformers' `_compute_yarn_parameters`: low frequencies interpolated by
        `factor`, high ones kept, a linear ramp between the `beta_fast`/`beta_slow` rotation counts, and an
        attention factor (0.1·ln(factor) + 1 unless the config gives one, or DeepSeek's mscale ratio)."""
        s, dim, base = self.scaling, self.dim, self.base
        old_ctx = float(s["original_max_position_embeddings"])
        factor = s.get("factor") or self.max_position / old_ctx

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = s.get("attention_factor")
        if attention is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
        extrapolation = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, float(attention)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        # NTK-aware: stretch the base once the sequence outgrows the trained context.
        if seq_len <= self.max_position:
            return self.inv_freq
        factor = float(self.scaling["factor"])
        base = self.base * ((factor * seq_len / self.max_position) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return self._inv_freq(base)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (batch, seq, head_dim) for integer `positions` (batch, seq)."""
        inv_freq = self.inv_freq
        if self.kind == "dynamic":
            inv_freq = self._dynamic_inv_freq(int(positions.max()) + 1)
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.attention_scaling != 1.0:
            return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def cos_sin_at(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin (head_dim,) at one position: `cos_sin`'s values in a third of its ops (a decode step's
        rotation, where ~9 small tensor ops cost more than the arithmetic)."""
        if self.kind == "dynamic":
            cos, sin = self.cos_sin(torch.tensor([[pos]]), torch.float32)
            return cos.reshape(-1), sin.reshape(-1)
        if self._twice is None:
            self._twice = torch.cat((self.inv_freq, self.inv_freq)).to(torch.float32)
        emb = self._twice * float(pos)
        if self.attention_scaling != 1.0:
            return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (batch, heads, seq, head_dim) in the half-split layout HF Llama checkpoints use."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin

"""Rotary position embedding (rotate-half form) and the Llama-3 frequency scaling.

megatron-core's RotaryEmbedding has the Llama-3 constants below built in (only the factor is a parameter), so they
are the ones a converted model can represent; the converter checks HF configs against them.
"""

from __future__ import annotations

import math

import torch

LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_inv_freq(head_dim: int, base: float, llama3_factor: float | None = None) -> torch.Tensor:
    """[head_dim // 2] float64 inverse frequencies; Llama-3 scaled when ``llama3_factor`` is given."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if llama3_factor is None:
        return inv
    low, high = LLAMA3_ROPE["low_freq_factor"], LLAMA3_ROPE["high_freq_factor"]
    orig = LLAMA3_ROPE["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / low, inv / llama3_factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / llama3_factor + smooth * scaled
    is_mid = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(is_mid, mid, scaled)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [b, heads, s, hn], positions [b, s] int -> [b, heads, s, hn]."""
    ang = positions.to(torch.float64)[..., None] * inv_freq  # [b, s, hn/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[:, None]  # [b, 1, s, hn]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


__all__ = ["LLAMA3_ROPE", "rope_inv_freq", "apply_rope"]

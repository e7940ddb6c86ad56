"""The delayed-eviction rule and the attention biases that implement it (pure torch).

Rule (DMS, delayed eviction with window w): ``evict[k]`` is the final flag of key k, produced by the decision at
position k+1. Query q sees key k iff k <= q and (q - k <= w or not evict[k]): a flagged key stays visible to the
w queries after it (the last w+1 tokens, the query included, are always visible) and is gone afterwards.

Training replaces the hard rule by an additive bias log(1 - alpha_k) = logsigmoid(-z_k) on key k for queries
with q - k > w, where z_k are the (noisy, temperature-scaled) eviction log-odds of key k.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dms_megatron.core.gating import hard_decisions


def decisions_to_key_logits(logits: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
    """Align per-position decisions with the keys they decide about.

    logits: [..., T], the decision produced at position t. Returns [..., T] where out[..., k] = logits[..., k+1]
    and out[..., T-1] = ``fill`` (the last key's decision is not produced yet; -inf = "keep").
    Works for bool flags too (fill is cast, e.g. fill=0 -> False).
    """
    pad = torch.full_like(logits[..., :1], fill)
    return torch.cat([logits[..., 1:], pad], dim=-1)


def far_key_bias(key_logits: torch.Tensor, hard: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive bias of each key for queries beyond its window, [..., T] -> [..., T]: soft (training)
    logsigmoid(-z_k) = log(1 - alpha_k) (differentiable in z); hard (inference) -inf where the key is evicted
    (z_k > 0), else 0. Every DMS kernel applies exactly this."""
    if hard:
        return torch.zeros(key_logits.shape, dtype=dtype, device=key_logits.device).masked_fill(
            hard_decisions(key_logits), float("-inf"))
    return F.logsigmoid(-key_logits.to(dtype))


def _distance(q_len: int, k_len: int, device) -> torch.Tensor:
    """[Tq, Tk] int64 distance q - k, with the Tq queries being the last Tq of the Tk positions."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return q_pos[:, None] - k_pos[None, :]


def eviction_visibility(evict: torch.Tensor, window: int, q_len: Optional[int] = None) -> torch.Tensor:
    """Which keys each query sees under delayed eviction.

    evict: bool [..., T], final flag of key k (decision produced at position k+1).
    window: w >= 0. q_len: number of queries, the last q_len of the T positions (default T).
    Returns bool [..., q_len, T]: visible[..., i, k] = k <= q and (q - k <= w or not evict[k]) with q = T - q_len + i.
    """
    if window < 0:
        raise ValueError(f"window={window} must be >= 0")
    t = evict.shape[-1]
    q_len = t if q_len is None else q_len
    d = _distance(q_len, t, evict.device)
    causal = d >= 0
    recent = d <= window
    keep = ~evict.bool()[..., None, :]
    return causal & (recent | keep)


def dms_soft_bias(key_logits: torch.Tensor, window: int, q_len: Optional[int] = None) -> torch.Tensor:
    """Training bias: causal mask plus log(1 - alpha_k) for queries more than ``window`` positions after key k.

    key_logits: [..., T] eviction log-odds z_k per key (already aligned to keys and divided by tau; the last key
    should be -inf). Returns float [..., q_len, T]: -inf where k > q; logsigmoid(-z_k) where q - k > w; else 0.
    """
    t = key_logits.shape[-1]
    q_len = t if q_len is None else q_len
    d = _distance(q_len, t, key_logits.device)
    log_keep = far_key_bias(key_logits, hard=False, dtype=key_logits.dtype)[..., None, :]
    bias = torch.where(d > window, log_keep, torch.zeros((), dtype=key_logits.dtype, device=key_logits.device))
    return bias.masked_fill(d < 0, float("-inf"))


def dms_hard_bias(evict: torch.Tensor, window: int, q_len: Optional[int] = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inference-equivalent bias: 0 where ``eviction_visibility`` is True, -inf elsewhere. [..., q_len, T]."""
    vis = eviction_visibility(evict, window, q_len)
    return torch.zeros(vis.shape, dtype=dtype, device=evict.device).masked_fill(~vis, float("-inf"))


def causal_bias(q_len: int, k_len: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Plain causal additive mask [q_len, k_len] (queries are the last q_len positions)."""
    d = _distance(q_len, k_len, device)
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(d < 0, float("-inf"))


__all__ = ["decisions_to_key_logits", "eviction_visibility", "far_key_bias", "dms_soft_bias", "dms_hard_bias",
           "causal_bias"]

"""The dense DMS kernel: SDPA with a materialised [b, np, sq, sk] additive bias (O(L^2) memory). The reference the
other kernels are tested against, and the CPU training path. Contract: ``core.attention.DMSKernel``.

Soft (training): bias log(1 - alpha_k) = logsigmoid(-z_k) on key k for queries more than ``window`` positions later;
hard (inference parity): keys with z_k > 0 are invisible to those queries.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dms_megatron.core.masks import causal_bias, dms_hard_bias, dms_soft_bias


def _group_bias(bias: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[b, ng, sq, sk] per-KV-head bias -> [b, np, sq, sk] per query head (group-major)."""
    b, ng, sq, sk = bias.shape
    g = num_heads // ng
    if g == 1:
        return bias
    return bias[:, :, None].expand(b, ng, g, sq, sk).reshape(b, num_heads, sq, sk)


def dense_dms_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        key_logits: Optional[torch.Tensor], window: int, softmax_scale: Optional[float] = None,
                        hard: bool = False) -> torch.Tensor:
    """Reference DMS attention with a materialised [b, np, sq, sk] additive bias (O(L^2) memory).

    Differentiable w.r.t. query, key, value and key_logits (soft mode). See the module docstring for shapes.
    """
    b, np_, sq, hn = query.shape
    sk = key.shape[-2]
    if key_logits is None:
        if sq == sk:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=softmax_scale,
                                                  enable_gqa=key.shape[1] != np_)
        bias = causal_bias(sq, sk, dtype=query.dtype, device=query.device)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=softmax_scale,
                                              enable_gqa=key.shape[1] != np_)
    if hard:
        bias = dms_hard_bias(key_logits > 0, window, q_len=sq, dtype=query.dtype)
    else:
        bias = dms_soft_bias(key_logits.to(query.dtype), window, q_len=sq)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=_group_bias(bias, np_),
                                          scale=softmax_scale, enable_gqa=key.shape[1] != np_)


__all__ = ["dense_dms_attention"]

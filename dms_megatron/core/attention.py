"""DMS attention kernels: a dense additive-bias reference and a FlexAttention variant (pure torch).

Both take per-key eviction scores and apply them only to queries more than ``window`` positions after the key:

- soft (training): bias log(1 - alpha_k) = logsigmoid(-z_k), z_k = eviction log-odds of key k (noisy, / tau);
- hard (inference parity): keys with z_k > 0 are invisible to queries more than ``window`` positions later.

Shapes: query [b, np, sq, hn], key/value [b, ng, sk, hn] (GQA: query head h uses KV head h // (np // ng)),
key_logits [b, ng, sk] aligned to keys (see ``masks.decisions_to_key_logits``) or None for plain causal attention.
The sq queries are the last sq of the sk positions (sq == sk in training). Output [b, np, sq, hn].
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


def flex_dms_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_logits: Optional[torch.Tensor], window: int, softmax_scale: Optional[float] = None,
                       hard: bool = False, compiled: Optional[bool] = None) -> torch.Tensor:
    """DMS attention through FlexAttention: causal block mask + a ``score_mod`` that reads an O(L) per-key bias.

    Extra memory is O(b * ng * sk) for the bias vector (plus the block mask), not O(L^2). Forward runs on CPU
    (eager) and GPU; the backward needs a GPU. ``compiled``: wrap flex_attention in torch.compile (default: on
    CUDA only).
    """
    from torch.nn.attention.flex_attention import flex_attention

    b, np_, sq, hn = query.shape
    ng, sk = key.shape[1], key.shape[2]
    g = np_ // ng
    offset = sk - sq
    block_mask = causal_block_mask(sq, sk, query.device)
    if key_logits is None:
        score_mod = None
    else:
        if hard:
            kbias = torch.zeros(key_logits.shape, dtype=query.dtype, device=query.device)
            kbias = kbias.masked_fill(key_logits > 0, float("-inf"))
        else:
            kbias = F.logsigmoid(-key_logits.to(query.dtype))

        def score_mod(score, b_, h_, q_idx, kv_idx):
            far = (q_idx + offset - kv_idx) > window
            return score + torch.where(far, kbias[b_, h_ // g, kv_idx], 0.0)

    fn = flex_attention
    if compiled is None:
        compiled = query.is_cuda
    if compiled:
        fn = _compiled_flex()
    return fn(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=softmax_scale,
              enable_gqa=ng != np_)


_COMPILED = None
FLEX_BLOCK = 128


def causal_block_mask(sq: int, sk: int, device, block: int = FLEX_BLOCK):
    """FlexAttention BlockMask for causal attention of the last ``sq`` of ``sk`` positions, built from block
    counts in O((sq/block) * (sk/block)) memory (``create_block_mask`` would evaluate the mask on all sq*sk pairs)."""
    from torch.nn.attention.flex_attention import BlockMask

    offset = sk - sq
    nq, nk = -(-sq // block), -(-sk // block)
    q_first = torch.arange(nq, device=device) * block + offset  # position of each q block's first query
    q_last = torch.clamp(q_first + block - 1, max=sk - 1)
    k_first = torch.arange(nk, device=device) * block
    k_last = torch.clamp(k_first + block - 1, max=sk - 1)
    full = k_last[None, :] <= q_first[:, None]  # every (q, k) pair in the tile is causal-visible
    any_ = k_first[None, :] <= q_last[:, None]
    if sk % block or sq % block:  # ragged edge tiles are never "full": let mask_mod handle them
        full = full & (k_last - k_first + 1 == block)[None, :] & (q_last - q_first + 1 == block)[:, None]
    partial = any_ & ~full
    order = torch.arange(nk, device=device)

    def pack(sel):
        num = sel.sum(-1).to(torch.int32)
        # selected block indices first (stable), padded with the rest
        key_ = torch.where(sel, order[None, :], order[None, :] + nk)
        idx = torch.sort(key_, dim=-1).values % nk
        return num[None, None], idx.to(torch.int32)[None, None]

    def causal(b_, h_, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=causal,
                                    seq_lengths=(sq, sk))


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


from dms_megatron.core.triton_dms import triton_dms_attention  # noqa: E402  (triton imported on first call)
from dms_megatron.core.two_part import two_part_dms_attention  # noqa: E402

BACKENDS = {"dense": dense_dms_attention, "flex": flex_dms_attention, "triton": triton_dms_attention,
            "two_part": two_part_dms_attention}

__all__ = ["dense_dms_attention", "flex_dms_attention", "BACKENDS"]

"""The FlexAttention DMS kernel: a causal block mask + a ``score_mod`` that reads an O(L) per-key bias, compiled per
length bucket (no compile cliff). Contract: ``core.attention.DMSKernel``. FlexAttention has no CPU backward: on CPU it
serves inference-mode checks only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dms_megatron.core.masks import far_key_bias


def flex_dms_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_logits: Optional[torch.Tensor], window: int, softmax_scale: Optional[float] = None,
                       hard: bool = False, compiled: Optional[bool] = None) -> torch.Tensor:
    """DMS attention through FlexAttention: causal block mask + a ``score_mod`` that reads an O(L) per-key bias.

    Extra memory is O(b * ng * sk) for the bias vector (plus the block mask), not O(L^2). ``compiled``: wrap
    flex_attention in torch.compile (default: on CUDA; eager flex on CUDA raises, it materialises the scores).
    Compiled, sq and sk are padded up to ``flex_bucket`` sizes and the query offset and window are tensors, so a
    process compiles one graph per bucket, not per length; one more distinct shape than
    torch._dynamo.config.recompile_limit raises (dynamo would otherwise run flex eagerly, at L x L memory).
    Padding is exact: padded keys sit after every real query (invisible by causality), padded query rows are cut.
    """
    b, np_, sq, hn = query.shape
    ng, sk = key.shape[1], key.shape[2]
    if compiled is None:
        compiled = query.is_cuda
    if query.is_cuda and not compiled:
        raise ValueError("flex_dms_attention: eager flex_attention on CUDA materialises [b, np, sq, sk] scores; "
                         "use compiled=True (the default on CUDA)")
    sq_pad, sk_pad = (flex_bucket(sq), flex_bucket(sk)) if compiled else (sq, sk)
    kbias = None if key_logits is None else _flex_key_bias(key_logits, hard, query.dtype, sk_pad)
    offset = torch.tensor(sk - sq, device=query.device)                               # tensors: no recompiles
    score_mod = None if kbias is None else _dms_score_mod(kbias, offset, torch.tensor(window, device=query.device),
                                                          np_ // ng)
    block_mask = causal_block_mask(sq_pad, sk_pad, query.device, offset=sk - sq)
    q = F.pad(query, (0, 0, 0, sq_pad - sq)) if sq_pad > sq else query                # [b, np, sq_pad, hn]
    k, v = (F.pad(t, (0, 0, 0, sk_pad - sk)) if sk_pad > sk else t for t in (key, value))  # [b, ng, sk_pad, hn]
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=softmax_scale, enable_gqa=ng != np_)
    if not compiled:
        return flex_attention(q, k, v, **kw)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, key_logits))
    _count_flex_graph((sq_pad, sk_pad, b, np_, ng, hn, query.dtype, query.device.type, kbias is None, grad,
                       softmax_scale))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        out = _compiled_flex()(q, k, v, **kw)
    return out[:, :, :sq] if sq_pad > sq else out


def flex_bucket(n: int) -> int:
    """Compiled-flex length bucket: 128, then the smallest of 2^k and 1.5 * 2^k (k >= 8) that is >= n; always a
    multiple of the 128 flex tile, at most 50% padding above 256, 20 buckets up to 128k."""
    if n < 1:
        raise ValueError(f"flex_bucket: length {n} must be >= 1")
    if n <= FLEX_BLOCK:
        return FLEX_BLOCK
    size = 2 * FLEX_BLOCK
    while True:
        for cand in (size, size * 3 // 2):
            if cand >= n:
                return cand
        size *= 2


def _flex_key_bias(key_logits: torch.Tensor, hard: bool, dtype, sk_pad: int) -> torch.Tensor:
    """Per-key far bias [b, ng, sk_pad] (zeros on padded keys): soft logsigmoid(-z), hard 0 / -inf where z > 0."""
    kbias = far_key_bias(key_logits, hard, dtype)
    pad = sk_pad - key_logits.shape[-1]
    return F.pad(kbias, (0, pad)) if pad else kbias


def _dms_score_mod(kbias: torch.Tensor, offset: torch.Tensor, window: torch.Tensor, group: int):
    def score_mod(score, b_, h_, q_idx, kv_idx):
        far = (q_idx + offset - kv_idx) > window
        return score + torch.where(far, kbias[b_, h_ // group, kv_idx], 0.0)

    return score_mod


_FLEX_GRAPHS: set = set()


def _count_flex_graph(key: tuple) -> None:
    """Explicit guard on the compiled flex graphs of this process (one per distinct padded shape/dtype/mode)."""
    if key in _FLEX_GRAPHS:
        return
    limit = torch._dynamo.config.recompile_limit
    if len(_FLEX_GRAPHS) >= limit:
        raise RuntimeError(f"flex_dms_attention: shape {key} would be compiled shape {len(_FLEX_GRAPHS) + 1} > "
                           f"torch._dynamo.config.recompile_limit={limit} (beyond it flex runs eagerly at L x L "
                           "memory): use fewer distinct lengths/shapes per process or raise the limit")
    _FLEX_GRAPHS.add(key)


_COMPILED = None
FLEX_BLOCK = 128


def causal_block_mask(sq: int, sk: int, device, block: int = FLEX_BLOCK, offset: Optional[int] = None):
    """FlexAttention BlockMask for causal attention of the last ``sq`` of ``sk`` positions (query i at position
    ``offset`` + i, default sk - sq), built from block counts in O((sq/block) * (sk/block)) memory
    (``create_block_mask`` would evaluate the mask on all sq*sk pairs). The mask_mod reads the offset as a tensor."""
    offset = sk - sq if offset is None else offset
    offset_t = torch.tensor(offset, device=device)
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
        return q_idx + offset_t >= kv_idx

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=causal,
                                    seq_lengths=(sq, sk))


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


__all__ = ["flex_dms_attention", "flex_bucket", "causal_block_mask", "FLEX_BLOCK"]

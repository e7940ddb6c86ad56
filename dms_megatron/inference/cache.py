"""Per-(sequence, KV head) variable-length KV storage and the DMS eviction bookkeeping (plain functions).

Storage is slot-based ("compacted with a free list"): one layer holds k, v [B, ng, cap, hn] and per slot its token
position ``pos`` [B, ng, cap] (-1 = free), the DMS eviction flag ``flag`` and a float ``score`` that a press may
use (e.g. H2O's accumulated attention). Every (sequence, KV head) pair keeps its own set of live slots, so heads
hold different numbers of tokens; a dropped token frees its slot, which the next insert reuses, so ``cap`` stays
near the largest live count (it doubles when a pair runs out of free slots). Attention reads live slots only.

DMS rule with window w (see dms_megatron.core.masks): the decision produced by token t flags token t-1; a flagged
token is dropped once it is more than w positions behind the newest token of its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dms_megatron.core.gating import hard_decisions
from dms_megatron.core.masks import decisions_to_key_logits

FREE = -1


@dataclass
class LayerCache:
    """KV storage of one layer for B sequences. k, v [B, ng, cap, hn]; pos long, flag bool, score float [B, ng, cap]."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    flag: torch.Tensor
    score: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]

    @property
    def live(self) -> torch.Tensor:
        """bool [B, ng, cap]: slots holding a token."""
        return self.pos >= 0


def new_layer_cache(batch: int, kv_heads: int, head_dim: int, capacity: int = 16,
                    dtype: torch.dtype = torch.float32, device=None) -> LayerCache:
    shape = (batch, kv_heads, capacity)
    return LayerCache(k=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
                      v=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
                      pos=torch.full(shape, FREE, dtype=torch.long, device=device),
                      flag=torch.zeros(shape, dtype=torch.bool, device=device),
                      score=torch.zeros(shape, dtype=torch.float32, device=device))


def grow(cache: LayerCache, capacity: int) -> None:
    """Enlarge every tensor of ``cache`` to at least ``capacity`` slots (doubling), keeping the slot layout."""
    cap = cache.capacity
    if capacity <= cap:
        return
    new = max(capacity, 2 * cap)
    extra = new - cap

    def pad(t: torch.Tensor, fill) -> torch.Tensor:
        shape = list(t.shape)
        shape[2] = extra
        return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=2)

    cache.k, cache.v = pad(cache.k, 0), pad(cache.v, 0)
    cache.pos, cache.flag, cache.score = pad(cache.pos, FREE), pad(cache.flag, False), pad(cache.score, 0.0)


def insert(cache: LayerCache, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
           flags: torch.Tensor) -> None:
    """Write S new tokens of sequences ``rows`` into free slots (the j-th token goes to the j-th free slot).

    rows [n] sequence indices; k, v [n, ng, S, hn]; positions [n, S]; flags bool [n, ng, S] (eviction flags already
    known for these tokens, i.e. decided by the following token of the same chunk).
    """
    n, ng, s, _ = k.shape
    free = cache.pos[rows] < 0  # [n, ng, cap]
    need = s - int(free.sum(-1).min())
    if need > 0:
        grow(cache, cache.capacity + need)
        free = cache.pos[rows] < 0
    if s == 1:
        slots = free.to(torch.int8).argmax(-1, keepdim=True)  # first free slot [n, ng, 1]
    else:
        slots = torch.argsort((~free).to(torch.int8), dim=-1, stable=True)[..., :s]  # first s free slots
    r = rows[:, None, None].expand(n, ng, s)
    h = torch.arange(ng, device=k.device)[None, :, None].expand(n, ng, s)
    cache.k[r, h, slots] = k.to(cache.k.dtype)
    cache.v[r, h, slots] = v.to(cache.v.dtype)
    cache.pos[r, h, slots] = positions[:, None, :].expand(n, ng, s)
    cache.flag[r, h, slots] = flags
    cache.score[r, h, slots] = 0.0


def drop(cache: LayerCache, rows: torch.Tensor, mask: torch.Tensor) -> None:
    """Free the slots ``mask`` [n, ng, cap] of sequences ``rows``."""
    if not bool(mask.any()):
        return
    pos, flag, score = cache.pos[rows], cache.flag[rows], cache.score[rows]
    cache.pos[rows] = pos.masked_fill(mask, FREE)
    cache.flag[rows] = flag & ~mask
    cache.score[rows] = score.masked_fill(mask, 0.0)


def resident(cache: LayerCache) -> torch.Tensor:
    """[B] tokens held by each sequence, summed over KV heads."""
    return cache.live.sum(dim=(1, 2))


# ---------------------------------------------------------------------------------------------------------------
# DMS bookkeeping
# ---------------------------------------------------------------------------------------------------------------
def chunk_flags(decisions: torch.Tensor) -> torch.Tensor:
    """Flags of a chunk's own tokens from its decisions: decisions [n, ng, S] logits -> bool [n, ng, S], token j is
    flagged by the decision of token j+1; the last token's decision comes later (False for now)."""
    return decisions_to_key_logits(hard_decisions(decisions), fill=False)


def flag_previous(cache: LayerCache, rows: torch.Tensor, first_pos: torch.Tensor, first_decision: torch.Tensor) -> None:
    """The decision of each sequence's first new token (position first_pos [n], logits [n, ng]) flags the cached
    token at first_pos - 1 when the logit is > 0 (nothing to flag at position 0)."""
    target = (first_pos - 1)[:, None, None]  # [n, 1, 1]
    hit = (cache.pos[rows] == target) & (target >= 0) & hard_decisions(first_decision)[..., None]  # [n, ng, cap]
    cache.flag[rows] = cache.flag[rows] | hit


def visible(cache: LayerCache, rows: torch.Tensor, q_pos: torch.Tensor, window: int) -> torch.Tensor:
    """bool [n, ng, S, cap]: live slot with position p is visible to the query at q iff p <= q and
    (q - p <= window or not flagged). q_pos [n, S]."""
    pos = cache.pos[rows][:, :, None, :]  # [n, ng, 1, cap]
    flag = cache.flag[rows][:, :, None, :]
    d = q_pos[:, None, :, None] - pos  # [n, ng, S, cap]
    return (pos >= 0) & (d >= 0) & ((d <= window) | ~flag)


def expired(cache: LayerCache, rows: torch.Tensor, newest: torch.Tensor, window: int) -> torch.Tensor:
    """bool [n, ng, cap]: flagged live slots more than ``window`` positions behind newest [n] (to drop)."""
    pos = cache.pos[rows]
    return (pos >= 0) & cache.flag[rows] & (newest[:, None, None] - pos > window)


__all__ = ["LayerCache", "new_layer_cache", "grow", "insert", "drop", "resident", "chunk_flags", "flag_previous",
           "visible", "expired", "FREE"]

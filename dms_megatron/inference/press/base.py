"""The press interface: each KV-cache method (one file each) decides which cache entries a sequence keeps and which it reads.

The engine calls, per layer and step, for sequences ``rows`` [n] with S new tokens at positions [n, S]:
  new_flags(cache, rows, positions, decisions) -> bool [n, ng, S] eviction flags of the new tokens (before insert)
  read_mask(cache, rows, q, visible)           -> bool [n, ng, S, cap] slots the queries read (default: visible)
  after_attention(cache, rows, probs, newest)  -> drops entries (probs [n, ng, g, S, cap] attention weights)
``window`` is the DMS delayed-eviction window used by the visibility rule (None: flags are never set).
``budget`` is the number of tokens a (sequence, layer, KV head) keeps (or reads, for Quest).
"""

from __future__ import annotations

from typing import Optional

import torch

import dms_megatron.inference.cache as kv


class Press:
    name = "base"
    window: Optional[int] = None
    budget: Optional[int] = None
    needs_decisions = False
    required: tuple = ()  # constructor arguments make_press passes first: "budget" and/or "window"

    def new_flags(self, cache: kv.LayerCache, rows, positions, decisions) -> torch.Tensor:
        n, s = positions.shape
        return torch.zeros(n, cache.pos.shape[1], s, dtype=torch.bool, device=positions.device)

    def read_mask(self, cache: kv.LayerCache, rows, q, visible) -> torch.Tensor:
        return visible

    def after_attention(self, cache: kv.LayerCache, rows, probs, newest) -> None:
        return None


def check_budget(name: str, budget) -> int:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"press {name}: budget={budget!r} must be an integer >= 1 (tokens kept per sequence, layer "
                         f"and KV head)")
    return budget


def keep_top(cache: kv.LayerCache, rows, key: torch.Tensor, budget: int) -> None:
    """Drop every live slot outside the ``budget`` largest ``key`` [n, ng, cap] of its (sequence, KV head)."""
    live = cache.pos[rows] >= 0
    if int(live.sum(-1).max()) <= budget:
        return
    key = key.masked_fill(~live, float("-inf"))
    idx = key.topk(min(budget, key.shape[-1]), dim=-1).indices
    keep = torch.zeros_like(live).scatter_(-1, idx, True)
    kv.drop(cache, rows, live & ~keep)


__all__ = ["Press", "keep_top", "check_budget"]

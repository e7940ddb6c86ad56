"""Achieved compression ratio: the one definition behind every CR the project reports (pure torch).

Counting rule (training decisions, held-out evaluation, report.json, dms-eval and the inference engine alike):

* A **key slot** is one (layer, KV head, sequence, key position t) where t holds a real token of the sequence.
  Padding is excluded; EOS and every other token are included (an EOS is written to the KV cache like any token).
* The slot is **evicted** when the decision made at position t + 1 flags it: DMS decides about key t when token t + 1
  arrives (``core.masks.decisions_to_key_logits``). The decision at position 0 concerns no key and is not counted.
  The last real key of a sequence has no decision yet (its next position is padding or past the end): it counts as
  **kept**, as it is in the cache when the sequence ends.
* **achieved CR = key slots / kept key slots**, pooled: both counts are summed over all layers, KV heads, positions,
  sequences and ranks before dividing (not a mean of per-sample ratios). evicted fraction = 1 - kept / slots.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def key_slot_flags(decisions: torch.Tensor, valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(evicted [b, ng, s], slots bool [b, 1, s]) of each key slot under the counting rule.

    decisions: [b, ng, s] the decision produced at each position (1 = evict the previous key; float, may carry
    gradients, e.g. straight-through hard decisions). valid: bool [b, s] real tokens (None: all real).
    evicted[..., t] = decisions[..., t + 1] where keys t and t + 1 are both real, else 0 (the last key: kept)."""
    b, _, s = decisions.shape
    v = torch.ones(b, s, dtype=torch.bool, device=decisions.device) if valid is None else valid.bool()
    d = decisions.float()
    nxt = d[..., 1:] * (v[:, 1:] & v[:, :-1])[:, None, :].to(d.dtype)
    evicted = torch.cat([nxt, torch.zeros_like(d[..., :1])], dim=-1)
    return evicted, v[:, None, :]


def evicted_key_fraction(decisions: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[b] fraction of each sequence's key slots (over its KV heads and real keys) that are evicted; differentiable
    in ``decisions`` (what the compression loss constrains). A sequence without real keys gives 0."""
    evicted, slots = key_slot_flags(decisions, valid)
    n = slots.sum(dim=(1, 2)).to(evicted.dtype) * evicted.shape[1]
    return evicted.sum(dim=(1, 2)) / n.clamp_min(1.0)


def achieved_cr(kept: float, slots: float) -> float:
    """key slots / kept key slots (inf when nothing is kept, 1.0 when there are no slots)."""
    if slots <= 0:
        return 1.0
    return float(slots) / kept if kept > 0 else float("inf")


def cr_from_evicted_fraction(fraction: float) -> float:
    """``achieved_cr`` from a pooled evicted fraction (slots 1, kept 1 - fraction)."""
    return achieved_cr(1.0 - float(fraction), 1.0)


__all__ = ["key_slot_flags", "evicted_key_fraction", "achieved_cr", "cr_from_evicted_fraction"]

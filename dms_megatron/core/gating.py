"""Eviction-decision logits and Gumbel-sigmoid gating (pure torch, no Megatron).

Notation: b batch, s sequence, np query heads, ng KV heads (GQA groups), hn head dim, g = np // ng.
Query heads are group-major: query head h belongs to KV head h // g (Megatron and Hugging Face agree).

A decision logit produced at position t belongs to key t-1 (see ``masks.decisions_to_key_logits``).
"""

from __future__ import annotations

from typing import Sequence

import torch

# --------------------------------------------------------------------------------------------------------------
# Decision logits
# --------------------------------------------------------------------------------------------------------------


def qneuron_decision_logits(query: torch.Tensor, num_groups: int, scale: float, offset: float) -> torch.Tensor:
    """Decision logits from the borrowed query neuron.

    query: [..., np, hn] (e.g. Megatron's [s, b, np, hn]), before RoPE (after q-norm if the model has one).
    Returns [..., ng]: query[..., first head of each group, -1] * scale - offset.
    """
    np_ = query.shape[-2]
    if np_ % num_groups:
        raise ValueError(f"{np_} query heads are not divisible into {num_groups} KV groups")
    g = np_ // num_groups
    return query[..., ::g, -1] * scale - offset


def zero_borrowed_neuron(query: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Return ``query`` with the borrowed neuron (last dim of the first head of each group) set to 0.

    query: [..., np, hn] -> same shape. Out of place, so autograd sees a mask multiply (no in-place write on a
    tensor that other ops saved). Apply it before RoPE and again after RoPE (RoPE mixes the last dim with its
    rotation partner).
    """
    np_, hn = query.shape[-2], query.shape[-1]
    g = np_ // num_groups
    keep = torch.ones(np_, hn, dtype=query.dtype, device=query.device)
    keep[::g, -1] = 0
    return query * keep


def projection_decision_logits(projected: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """Adapter variant: ``Linear(RMSNorm(h_pre))`` output [..., ng] -> logits [..., ng] = x * scale - offset."""
    return projected * scale - offset


def apply_alpha_per(logits: torch.Tensor, alpha_per: str) -> torch.Tensor:
    """Granularity of decisions. logits [..., ng] -> [..., ng].

    "head": unchanged; "layer": KV head 0's logit broadcast to every head of the layer.
    """
    if alpha_per == "head":
        return logits
    if alpha_per == "layer":
        return logits[..., :1].expand_as(logits)
    raise ValueError(f"alpha_per={alpha_per!r}: allowed values are 'head' and 'layer'")


# --------------------------------------------------------------------------------------------------------------
# Deterministic noise
# --------------------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer avalanche hash on int64 tensors holding values in [0, 2**32).

    Multipliers are < 2**31 so every product stays below 2**63 (no signed overflow on any device).
    """
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def logistic_noise(seed: int, step: int, layer: int, sample_ids: torch.Tensor, head_ids: torch.Tensor,
                   positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Counter-based Logistic(0, 1) noise (= the difference of two Gumbel(0, 1) samples).

    sample_ids: [b] global sample indices (so the noise of a sample does not depend on how the batch is split
    over data-parallel ranks and micro-batches); head_ids: [ng] global KV-head indices (independent of the
    tensor-parallel split); positions: [s] global token positions. Returns [b, ng, s] noise that is a pure
    function of (seed, step, layer, sample, head, position): identical on every device and parallel layout.
    """
    dev = positions.device
    base = _mix32(torch.tensor([(seed * 0x9E3779B1) & _M32], device=dev, dtype=torch.long))
    base = _mix32(base ^ (step & _M32))
    base = _mix32(base ^ ((layer * 0x85EBCA6B) & _M32))
    x = _mix32(base ^ (sample_ids.to(dev, torch.long)[:, None, None] & _M32))
    x = _mix32(x ^ (head_ids.to(dev, torch.long)[None, :, None] & _M32))
    x = _mix32(x ^ (positions.to(dev, torch.long)[None, None, :] & _M32))
    # 24 high-quality bits -> u in (0, 1), never exactly 0 or 1.
    u = ((x >> 8).to(torch.float64) + 0.5) / float(1 << 24)
    return (torch.log(u) - torch.log1p(-u)).to(dtype)


def gumbel_sigmoid(logits: torch.Tensor, noise: torch.Tensor, tau: float):
    """Relaxed Bernoulli with a straight-through hard sample.

    logits, noise: same shape [...]. Returns (probs, hard, noisy_logits), each [...]:
      noisy_logits = (logits + noise) / tau        (log-odds of eviction)
      probs        = sigmoid(noisy_logits)          (soft alpha)
      hard         = 1[probs > 0.5] with the gradient of probs (straight-through).
    """
    if noise.shape != logits.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != logits shape {tuple(logits.shape)}")
    noisy = (logits + noise) / tau
    probs = torch.sigmoid(noisy)
    hard = (probs > 0.5).to(probs.dtype) - probs.detach() + probs
    return probs, hard, noisy


def hard_decisions(logits: torch.Tensor) -> torch.Tensor:
    """Inference decisions: evict iff logit > 0. [...] float -> [...] bool."""
    return logits > 0


def global_ids(start: int, count: int, device=None) -> torch.Tensor:
    """Helper: [count] int64 tensor start, start+1, ... (global head or sample indices of a local shard)."""
    return torch.arange(start, start + count, device=device, dtype=torch.long)


__all__: Sequence[str] = [
    "qneuron_decision_logits", "zero_borrowed_neuron", "projection_decision_logits", "apply_alpha_per",
    "logistic_noise", "gumbel_sigmoid", "hard_decisions", "global_ids",
]

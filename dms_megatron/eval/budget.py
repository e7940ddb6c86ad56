"""Inference budgets of W parallel chains (the hyper-scaling accounting): peak KV tokens of a batch, KV reads, the
paper's decode-step latency model, majority vote / pass@W, and best-accuracy-at-budget frontiers. Pure functions.

Notation: W chains of one question, T decode steps, per chain and step ``resident`` (KV entries held after the step,
summed over layers and KV heads) and ``reads`` (entries read by the step, same sum).

Latency of one decode step of B chains (Łańcucki et al. 2025, Sec. 5):
  tau = max(FLOPs / peak_flops, bytes / bandwidth)
  FLOPs = 2 B P + 4 hn g R    (P: matmul weights per token; R: KV entries read, each by the g query heads of its
                               KV head: q.k and p.v, 2 hn FLOPs each)
  bytes = e (P + 2 hn R)      (weights once per step, K and V of every entry read; e bytes per element)
  P = layers (h (np + 2 ng) hn + np hn h + 3 h ffn) + h V    (QKV, output, SwiGLU MLP, LM head)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from dms_megatron.config import ConfigError


@dataclass(frozen=True)
class Hardware:
    """One accelerator of the latency model (defaults: H100 SXM, bf16 dense)."""

    peak_flops: float = 989.5e12
    bandwidth: float = 3.35e12  # bytes/s
    bytes_per_element: int = 2

    def __post_init__(self) -> None:
        for name in ("peak_flops", "bandwidth", "bytes_per_element"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"hardware.{name}={v!r} is invalid: must be a number > 0")


def matmul_weights(cfg) -> int:
    """P: the weights a token multiplies by in one forward (embedding lookup excluded), from the model's shape."""
    h, hn, np_, ng = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    per_layer = h * (np_ + 2 * ng) * hn + np_ * hn * h + 3 * h * cfg.ffn_hidden_size
    return cfg.num_layers * per_layer + h * cfg.vocab_size


def step_latency(cfg, chains: int, reads: float, hw: Hardware) -> float:
    """Modeled seconds of one decode step of ``chains`` sequences reading ``reads`` KV entries in all."""
    if chains <= 0:
        return 0.0
    p, hn, g = matmul_weights(cfg), cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    flops = 2 * chains * p + 4 * hn * g * reads
    nbytes = hw.bytes_per_element * (p + 2 * hn * reads)
    return max(flops / hw.peak_flops, nbytes / hw.bandwidth)


def batch_peak(resident: torch.Tensor, steps: int) -> float:
    """resident [W, T+1] (column 0: after the prompt; column t: after decode step t; a finished chain keeps its
    last value, its cache held until the batch ends) -> the most entries the W chains hold at once within the
    first ``steps`` decode steps."""
    return float(resident[:, :steps + 1].sum(0).max())


def batch_reads(reads: torch.Tensor, steps: int) -> float:
    """reads [W, T] (0 once a chain has finished) -> KV entries read by the W chains in the first ``steps``
    decode steps."""
    return float(reads[:, :steps].sum())


def batch_latency(cfg, reads: torch.Tensor, active: torch.Tensor, steps: int, hw: Hardware) -> float:
    """Modeled seconds of the first ``steps`` decode steps; reads [W, T], active bool [W, T] (chain still
    generating at that step)."""
    return sum(step_latency(cfg, int(active[:, t].sum()), float(reads[:, t].sum()), hw) for t in range(steps))


def majority(answers: Sequence[Optional[int]]) -> Optional[int]:
    """The most frequent answer of W chains (None = no answer, never voted for); ties go to the answer reached
    first in chain order."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == best)


def vote_accuracy(answers: Sequence[Sequence[Optional[int]]], truths: Sequence[int]) -> Tuple[float, float]:
    """(majority-vote accuracy, pass@W) over questions: answers[i] are question i's W chains' answers."""
    if not truths:
        raise ValueError("vote_accuracy: no questions")
    vote = sum(majority(a) == t for a, t in zip(answers, truths))
    hit = sum(t in a for a, t in zip(answers, truths))
    return vote / len(truths), hit / len(truths)


def frontier(points: Iterable[Tuple[float, float]], budgets: Sequence[float]) -> List[Optional[float]]:
    """Best accuracy reached at or under each budget, over (budget, accuracy) points (None: no point fits)."""
    pts = list(points)
    out = []
    for b in budgets:
        fit = [a for c, a in pts if c <= b * (1 + 1e-9)]
        out.append(max(fit) if fit else None)
    return out


def first_budget(points: Iterable[Tuple[float, float]], accuracy: float) -> Optional[float]:
    """The smallest budget at which the points reach ``accuracy`` (None: never)."""
    fit = [c for c, a in points if a >= accuracy - 1e-12]
    return min(fit) if fit else None


def families(methods: Dict[str, dict]) -> Dict[str, List[dict]]:
    """hyperscale.json's method entries grouped into frontier families: "vanilla", each DMS student on its own
    ("dms@4"), each baseline over all its CRs ("tova")."""
    fam: Dict[str, List[dict]] = {}
    for name, e in methods.items():
        fam.setdefault(name if e["method"] in ("vanilla", "dms") else e["method"], []).append(e)
    return fam


__all__ = ["Hardware", "matmul_weights", "step_latency", "batch_peak", "batch_reads", "batch_latency", "majority",
           "vote_accuracy", "frontier", "first_budget", "families"]

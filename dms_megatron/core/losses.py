"""DMS training objectives and the compression-ratio schedule (pure torch).

Total loss = KD(student, teacher) + compression_loss(evicted fraction, target(step)).
"""

from __future__ import annotations

from typing import Optional

import torch


def cr_at_step(step: int, initial_cr: float, final_cr: float, final_step: int) -> float:
    """Linear compression-ratio schedule: initial_cr at step 0, final_cr at ``final_step`` and after."""
    if final_step <= 0:
        raise ValueError(f"final_step={final_step} must be > 0")
    progress = min(max(step, 0) / final_step, 1.0)
    return initial_cr + (final_cr - initial_cr) * progress


def target_evicted_fraction(cr: float) -> float:
    """Fraction of KV entries to evict for compression ratio ``cr`` (>= 1): 1 - 1/cr."""
    if cr < 1:
        raise ValueError(f"compression ratio {cr} must be >= 1")
    return 1.0 - 1.0 / cr


def evicted_fraction(decisions: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean eviction decision per sample.

    decisions: [b, ng, s] (hard straight-through or soft, float). valid: bool [b, s] (False for padding), or None.
    Returns [b]: mean over heads and valid positions.
    """
    d = decisions.float()
    if valid is None:
        return d.mean(dim=(1, 2))
    v = valid.to(d.dtype)
    denom = (v.sum(dim=-1) * d.shape[1]).clamp_min(1.0)
    return (d * v[:, None, :]).sum(dim=(1, 2)) / denom


def compression_loss(frac: torch.Tensor, target: float) -> torch.Tensor:
    """One-sided compression loss: mean over the batch of max(0, target - frac).

    frac: [b] evicted fraction per sample (already averaged over layers and heads). Returns a scalar.
    Evicting more than the target costs nothing; the distillation loss keeps it from over-evicting.
    """
    return (target - frac).clamp(min=0).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
            direction: str = "student_teacher") -> torch.Tensor:
    """Per-token KL divergence between student and teacher next-token distributions, averaged over tokens.

    student_logits, teacher_logits: [..., V]; loss_mask: bool/float [...] (False/0 = excluded, e.g. padding and
    positions predicting from EOS) or None. direction: "student_teacher" = KL(student || teacher)
    = sum p_s (log p_s - log p_t) (the reference implementation's choice); "teacher_student" = KL(teacher || student).
    Returns a scalar: sum of masked per-token KL / number of unmasked tokens (at least 1).
    """
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    if direction == "student_teacher":
        tok = (s.exp() * (s - t)).sum(-1)
    elif direction == "teacher_student":
        tok = (t.exp() * (t - s)).sum(-1)
    else:
        raise ValueError(f"direction={direction!r}: allowed values are 'student_teacher', 'teacher_student'")
    if loss_mask is None:
        return tok.mean()
    m = loss_mask.to(tok.dtype)
    return (tok * m).sum() / m.sum().clamp_min(1.0)


__all__ = ["cr_at_step", "target_evicted_fraction", "evicted_fraction", "compression_loss", "kd_loss"]

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


#: compression losses: "one_sided" charges under-eviction below the target (the paper's); "band" charges only what
#: leaves a tolerance band around the target, on either side
CR_LOSSES = ("one_sided", "band")


def band_upper_fraction(cr: float, band: float) -> float:
    """Highest evicted fraction the "band" loss leaves free at compression ratio ``cr``: that of CR x (1 + band)."""
    if band < 0:
        raise ValueError(f"band {band} must be >= 0")
    return target_evicted_fraction(cr * (1.0 + band))


def band_lower_fraction(cr: float, band: float) -> float:
    """Lowest evicted fraction the "band" loss leaves free at compression ratio ``cr``: that of CR x (1 - band),
    and 0 where that is below CR 1 (no eviction is never charged)."""
    if not 0 <= band <= 1:
        raise ValueError(f"band {band} must be in [0, 1]")
    return target_evicted_fraction(max(1.0, cr * (1.0 - band)))


def compression_loss(frac: torch.Tensor, target: float, upper: Optional[float] = None) -> torch.Tensor:
    """Compression loss, mean over the batch of max(0, target - frac) + max(0, frac - upper).

    frac: [b] evicted fraction per sample (already averaged over layers and heads); target: the evicted fraction
    below which the shortfall is charged (the scheduled target for the paper's one-sided loss, the band's lower edge
    ``band_lower_fraction`` for the band loss); upper: None for the one-sided loss (evicting more than the target
    costs nothing, only the distillation loss resists it), else the evicted fraction above which over-eviction is
    charged too (>= target; ``band_upper_fraction``). Returns a scalar.
    """
    loss = (target - frac).clamp(min=0)
    if upper is not None:
        if upper < target:
            raise ValueError(f"upper evicted fraction {upper} is below the target {target}")
        loss = loss + (frac - upper).clamp(min=0)
    return loss.mean()


def token_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
             direction: str = "student_teacher") -> torch.Tensor:
    """Per-token KL from log-probabilities [..., V] -> [...] (summed over the last dim, which may be one rank's
    vocabulary shard). "student_teacher" = KL(student || teacher) = sum p_s (log p_s - log p_t) (the reference
    implementation's choice); "teacher_student" = KL(teacher || student)."""
    s, t = student_logprobs, teacher_logprobs
    if direction == "student_teacher":
        return (s.exp() * (s - t)).sum(-1)
    if direction == "teacher_student":
        return (t.exp() * (t - s)).sum(-1)
    raise ValueError(f"direction={direction!r}: allowed values are 'student_teacher', 'teacher_student'")


def masked_token_mean(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_token`` [...] over positions where ``loss_mask`` [...] is set (all when None; at least 1)."""
    if loss_mask is None:
        return per_token.mean()
    m = loss_mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
            direction: str = "student_teacher") -> torch.Tensor:
    """Per-token KL divergence between student and teacher next-token distributions, averaged over tokens.

    student_logits, teacher_logits: [..., V]; loss_mask: bool/float [...] (False/0 = excluded, e.g. padding and
    positions predicting from EOS) or None. Returns a scalar: masked mean of ``token_kl``.
    """
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return masked_token_mean(token_kl(s, t, direction), loss_mask)


__all__ = ["cr_at_step", "target_evicted_fraction", "CR_LOSSES", "band_upper_fraction", "band_lower_fraction",
           "compression_loss", "kd_loss", "token_kl", "masked_token_mean"]

"""Evaluation helpers over one-rank megatron models (tp = pp = 1; the tiny teacher's pre-training): LM loss and
teacher-forced predictions (full cache, or a DMS student's evicted cache: its hard-mode full forward equals decoding
with physical eviction, which the tests prove). A re-fit's end-of-run numbers come from the trainer's report stage."""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

from dms_megatron.data.recall import answer_accuracy
from dms_megatron.megatron.runtime import DMSRuntime, dms_forward


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean next-token cross-entropy. logits [b, s, V], labels/weights [b, s] (0 = excluded)."""
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           reduction="none")
    w = weights.reshape(-1).float()
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def _forward(model, tokens: torch.Tensor, runtime: Optional[DMSRuntime]) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
    ctx = dms_forward(model, runtime) if runtime is not None else contextlib.nullcontext()
    with ctx:
        return model(tokens, pos, None)


@torch.no_grad()
def teacher_forced_predictions(model, sequences: Sequence[Sequence[int]], vocab_size: int,
                               device: Optional[torch.device] = None, runtime_mode: Optional[str] = None,
                               batch_size: int = 32) -> List[List[int]]:
    """Greedy next-token prediction after every position of each sequence: out[i][t] = argmax p(. | seq[:t+1]).

    Sequences of a batch are right-padded with their last token (causal attention: padding never affects earlier
    positions). ``runtime_mode`` "hard" runs a DMS student with inference eviction, "teacher" without eviction."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out: List[List[int]] = []
    for i in range(0, len(sequences), batch_size):
        group = [list(s) for s in sequences[i:i + batch_size]]
        n = max(map(len, group))
        tokens = torch.tensor([s + [s[-1]] * (n - len(s)) for s in group], device=device)
        rt = DMSRuntime(mode=runtime_mode, record_flags=False) if runtime_mode else None
        pred = _forward(model, tokens, rt)[..., :vocab_size].argmax(-1).cpu()
        out += [pred[j, :len(s)].tolist() for j, s in enumerate(group)]
    model.train(was_training)
    return out


def recall_accuracy(model, items: List[dict], vocab_size: int, device: Optional[torch.device] = None,
                    runtime_mode: Optional[str] = None) -> float:
    """Teacher-forced accuracy at every answer position of held-out recall items (``runtime_mode`` "hard": a DMS
    student with inference eviction)."""
    predictions = teacher_forced_predictions(model, [it["ids"] for it in items], vocab_size, device, runtime_mode)
    return answer_accuracy(items, predictions)


__all__ = ["lm_loss", "teacher_forced_predictions", "recall_accuracy"]

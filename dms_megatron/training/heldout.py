"""Held-out recall at the training layout: recall items as micro batches of ``train.seq_length`` tokens, run
forward-only through the same tp x pp x dp schedule as training (teacher and student in one DistillationStage), and
scored on the last pipeline stage by a vocabulary-parallel argmax at every answer position (teacher-forced)."""

from __future__ import annotations

import math
from typing import List

import torch

from dms_megatron.config import ConfigError
from dms_megatron.megatron.parallel_loss import vocab_parallel_argmax

RECALL_KEYS = ("teacher_correct", "student_correct", "answers")


def _rows(items: List[dict], seq_length: int) -> dict:
    b = len(items)
    tokens = torch.zeros(b, seq_length, dtype=torch.long)
    valid = torch.zeros(b, seq_length, dtype=torch.bool)
    answer = torch.zeros(b, seq_length, dtype=torch.bool)  # positions whose next-token prediction is an answer
    for r, it in enumerate(items):
        ids = it["ids"]
        tokens[r, :len(ids)] = torch.tensor(ids)
        tokens[r, len(ids):] = ids[-1]  # causal attention: padding never reaches a real position
        valid[r, :len(ids)] = True
        for p in it["answers"]:
            answer[r, p - 1] = True
    targets = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    return {"tokens": tokens, "position_ids": torch.arange(seq_length)[None].expand(b, -1).contiguous(),
            "valid": valid, "answer_mask": answer, "targets": targets, "loss_mask": valid.float(),
            "sample_ids": torch.arange(b)}


def recall_micro_batches(items: List[dict], seq_length: int, micro_batch_size: int, dp_rank: int,
                         dp: int) -> List[dict]:
    """This data-parallel rank's micro batches of the held-out recall ``items`` ({"ids", "answers"}): every rank
    gets ceil(micro batches / dp) of them, the last ones filled with empty rows (no real token, no answer)."""
    long = [len(it["ids"]) for it in items if len(it["ids"]) > seq_length]
    if long:
        raise ConfigError(f"held-out recall items of {max(long)} tokens are longer than train.seq_length="
                          f"{seq_length}: raise train.seq_length or use items of at most that length")
    n_micro = math.ceil(len(items) / micro_batch_size)
    per_rank = max(1, math.ceil(n_micro / dp))
    empty = {"ids": [0], "answers": []}
    out = []
    for m in range(dp_rank * per_rank, (dp_rank + 1) * per_rank):
        chunk = items[m * micro_batch_size:(m + 1) * micro_batch_size]
        rows = _rows(chunk + [empty] * (micro_batch_size - len(chunk)), seq_length)
        rows["valid"][len(chunk):] = False
        rows["loss_mask"][len(chunk):] = 0.0
        out.append(rows)
    return out


def recall_counts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict, vocab_size: int) -> dict:
    """Correct greedy answers of student and teacher in one micro batch (logits [b, s, V / tp], vocabulary-sharded
    over the tensor-parallel group), and the number of answers; equal on every rank of the group."""
    pred = vocab_parallel_argmax(torch.stack([student_logits, teacher_logits]), vocab_size)  # [2, b, s]
    mask = batch["answer_mask"]
    hit = (pred == batch["targets"]) & mask
    return {"student_correct": float(hit[0].sum()), "teacher_correct": float(hit[1].sum()),
            "answers": float(mask.sum())}


__all__ = ["recall_micro_batches", "recall_counts", "RECALL_KEYS"]

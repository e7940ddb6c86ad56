"""Evaluation helpers: LM loss, greedy decoding (full or DMS-evicted cache semantics), held-out DMS metrics."""

from __future__ import annotations

from typing import Callable, List

import torch

from dms_megatron.core.losses import kd_loss


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean next-token cross-entropy. logits [b, s, V], labels/loss_mask [b, s]."""
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           reduction="none")
    m = loss_mask.reshape(-1).float()
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def greedy_predict_fn(model, vocab_size: int, runtime=None) -> Callable[[List[List[int]], int], List[List[int]]]:
    """A batch greedy decoder over a megatron GPT model (tp=pp=1).

    Each step re-runs the whole prefix: with ``runtime.mode == "hard"`` the DMS model's full forward equals decoding
    with physical eviction (tested), so the predictions are those of the evicted cache. Prompts are batched by
    equal length (up to 32 at a time; the recall evaluation set has one length).
    """
    from dms_megatron.megatron.runtime import attach_runtime

    def predict(prompts: List[List[int]], n: int) -> List[List[int]]:
        attach_runtime(model, runtime)
        was_training = model.training
        model.eval()
        groups = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        result = [None] * len(prompts)
        with torch.no_grad():
            for length, idx in groups.items():
                for start in range(0, len(idx), 32):
                    sel = idx[start:start + 32]
                    toks = torch.tensor([prompts[i] for i in sel], dtype=torch.long)
                    for _ in range(n):
                        pos = torch.arange(toks.shape[1])[None].expand(toks.shape[0], -1)
                        nxt = model(toks, pos, None)[:, -1, :vocab_size].argmax(-1)
                        toks = torch.cat([toks, nxt[:, None]], dim=1)
                    for j, i in enumerate(sel):
                        result[i] = toks[j, length:].tolist()
        model.train(was_training)
        return result

    return predict


@torch.no_grad()
def heldout_metrics(student, teacher, batches, vocab_size: int, runtime_cls) -> dict:
    """KL(student_hard || teacher) per token and the kept-key fraction under hard decisions on held-out batches.

    ``achieved_cr`` = 1 / (fraction of keys whose final hard flag is "keep"), over all layers, KV heads and
    non-padding positions.
    """
    from dms_megatron.megatron.runtime import attach_runtime

    kl_sum, tok = 0.0, 0.0
    kept, total = 0.0, 0.0
    student.eval()
    for b in batches:
        rt = runtime_cls(mode="hard")
        attach_runtime(student, rt)
        s = student(b["tokens"], b["position_ids"], None)[..., :vocab_size]
        t = teacher(b["tokens"], b["position_ids"], None)[..., :vocab_size]
        m = b["loss_mask"]
        kl_sum += kd_loss(s, t, m).item() * float(m.sum())
        tok += float(m.sum())
        valid = (m > 0)
        for flags in rt.key_flags.values():  # [b, ng, s]
            v = valid[:, None, :].expand_as(flags)
            kept += float((~flags & v).sum())
            total += float(v.sum())
    student.train()
    kept_frac = kept / max(total, 1.0)
    return {"kl_to_teacher": kl_sum / max(tok, 1.0), "kept_fraction": kept_frac,
            "achieved_cr": 1.0 / max(kept_frac, 1e-9)}

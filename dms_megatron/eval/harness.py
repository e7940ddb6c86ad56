"""Streaming evaluation of KV-cache methods on one engine: recall accuracy, KL to the teacher, memory and reads.

Every prompt is fed token by token (one batched decode step per position after the first token), so each method
makes its keep/evict choices online, exactly as it would while serving a long generation; no method sees the
question before deciding what to keep. Metrics per sequence come from the engine (``SequenceMetrics``):

  peak_tokens  max over steps of the tokens resident, summed over layers and KV heads (what memory must hold);
  kv_reads     KV tokens read over all steps, summed over layers and KV heads (what bandwidth must move).

Both are averaged over the sequences of a task. Notation: B sequences, L tokens each, V vocabulary.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dms_megatron.core.losses import kd_loss
from dms_megatron.inference.engine import Engine, Session


def stream(engine: Engine, prompts: Sequence[Sequence[int]], answer_len: int = 0, keep_logits: bool = False,
           at_prompt_end: Optional[Callable[[Session], None]] = None,
           ) -> Tuple[List[List[int]], List[dict], torch.Tensor | None]:
    """Feed equal-length ``prompts`` [B][L] token by token, then greedy-decode ``answer_len`` tokens.
    ``at_prompt_end(session)`` is called once the whole prompt is in (before any answer token).

    Returns (answers [B][answer_len], engine summaries [B], logits [B, L, V] fp32 when ``keep_logits``: the
    prediction after each prompt token)."""
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"stream: prompts must be non-empty and of one length (got lengths {sorted(lengths)})")
    b, n = len(prompts), lengths.pop()
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long)  # [B, L]
    session = engine.new_session(b)
    rows = list(range(b))
    last = torch.stack([engine.prefill(session, r, ids[r, :1])[-1] for r in rows])  # [B, V]
    kept = [last.float()] if keep_logits else None
    for t in range(1, n):
        last = engine.decode(session, rows, ids[:, t].tolist())
        if keep_logits:
            kept.append(last.float())
    if at_prompt_end is not None:
        at_prompt_end(session)
    answers: List[List[int]] = [[] for _ in rows]
    for k in range(answer_len):
        nxt = last.argmax(-1)
        for r in rows:
            answers[r].append(int(nxt[r]))
        if k + 1 < answer_len:
            last = engine.decode(session, rows, nxt.tolist())
    logits = torch.stack(kept, dim=1) if keep_logits else None
    return answers, engine.summary(session), logits


def _mean(rows: List[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def stated_position(prompt: Sequence[int], answer: Sequence[int]) -> Optional[int]:
    """Position of the first token of the first occurrence of ``answer`` in ``prompt`` (where the value was
    stated), or None."""
    n = len(answer)
    for i in range(len(prompt) - n + 1):
        if list(prompt[i:i + n]) == list(answer):
            return i
    return None


def answer_residency(session: Session, positions: Sequence[int]) -> torch.Tensor:
    """bool [B, layers, ng]: whether the token at ``positions[b]`` (the stated answer) is still held in the cache
    of each layer and KV head of sequence b."""
    pos = torch.tensor(list(positions))[:, None, None]  # [B, 1, 1]
    return torch.stack([(c.pos == pos).any(-1) for c in session.caches], dim=1)  # c.pos [B, ng, cap]


def recall_metrics(engine: Engine, items: List[dict]) -> dict:
    """Exact-match accuracy of the greedy answers to held-out recall questions ({"prompt_ids", "answer_ids"}),
    with mean peak tokens and KV reads per question. Items are grouped by prompt and answer length.

    Also, where every prompt states its answer: ``answer_resident`` [layers], the fraction of (question, KV head)
    pairs whose cache still holds the stated answer's first token when the question ends (what each layer could
    still read), and ``recall_acc_by_layer0`` {"held": acc, "dropped": acc}, accuracy split by whether layer 0 of
    any KV head still holds it (layer 0's DMS decision for a token is a function of the next token's identity
    alone, so it is the layer where learned eviction is blindest)."""
    groups: Dict[Tuple[int, int], List[dict]] = defaultdict(list)
    for it in items:
        groups[(len(it["prompt_ids"]), len(it["answer_ids"]))].append(it)
    hits, summaries, resident = [], [], []  # resident: one [group size, layers, ng] per group that states answers
    for (_, alen), group in sorted(groups.items()):
        where = [stated_position(it["prompt_ids"], it["answer_ids"]) for it in group]
        probe = None if None in where else (lambda s, w=where: resident.append(answer_residency(s, w)))
        answers, summ, _ = stream(engine, [it["prompt_ids"] for it in group], alen, at_prompt_end=probe)
        hits += [a == it["answer_ids"] for a, it in zip(answers, group)]
        summaries += summ
    out = {"recall_acc": sum(hits) / len(items), "peak_tokens": _mean(summaries, "peak_resident"),
           "kv_reads": _mean(summaries, "kv_reads"), "questions": len(items)}
    if len(resident) == len(groups):  # every prompt states its answer: resident rows align with hits
        r = torch.cat(resident)  # [questions, layers, ng]
        out["answer_resident"] = [round(float(x), 4) for x in r.float().mean(dim=(0, 2))]
        l0 = r[:, 0].any(-1)
        ok = torch.tensor(hits)
        out["recall_acc_by_layer0"] = {name: (round(float(ok[m].float().mean()), 4) if int(m.sum()) else None)
                                       for name, m in (("held", l0), ("dropped", ~l0))}
    return out


def kl_metrics(engine: Engine, sequences: torch.Tensor, teacher_logits: torch.Tensor) -> dict:
    """Mean per-token KL(model || teacher) of next-token distributions on held-out ``sequences`` [B, L] (the
    direction the re-fit trains), with mean peak tokens and KV reads per sequence. teacher_logits [B, L, V]."""
    _, summ, logits = stream(engine, sequences.tolist(), keep_logits=True)
    kl = float(kd_loss(logits, teacher_logits))
    return {"kl": kl, "peak_tokens": _mean(summ, "peak_resident"), "kv_reads": _mean(summ, "kv_reads")}


def teacher_logits(engine: Engine, sequences: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L, V] fp32 logits of the full-cache model (the KL reference)."""
    return stream(engine, sequences.tolist(), keep_logits=True)[2]


def budget_for(peak_tokens: float, layers: int, kv_heads: int) -> int:
    """Per (sequence, layer, KV head) token budget of a baseline matched to a DMS peak (summed over layers and KV
    heads). Rounded up: a baseline never gets less memory than DMS used."""
    return max(1, math.ceil(peak_tokens / (layers * kv_heads) - 1e-9))


__all__ = ["stream", "stated_position", "answer_residency", "recall_metrics", "kl_metrics", "teacher_logits",
           "budget_for"]

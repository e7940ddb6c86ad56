"""Streaming evaluation of KV-cache methods on one engine: recall accuracy, KL to the teacher, memory and reads.

Every sequence is fed token by token (one batched decode step per position after the first token), so each method
makes its keep/evict choices online, exactly as it would while serving a long generation; no method sees a question
before deciding what to keep. Recall items are teacher-forced: at every answer position the method's greedy
prediction is compared with the answer, and the cache is probed for the statement that answer was given in.
Metrics per sequence come from the engine (``SequenceMetrics``):

  peak_tokens  max over steps of the tokens resident, summed over layers and KV heads (what memory must hold);
  kv_reads     KV tokens read over all steps, summed over layers and KV heads (what bandwidth must move);
  achieved_cr  core.compression's CR pooled over the sequences of a task (key slots / kept key slots).

Both are averaged over the sequences of a task. Notation: B sequences, L tokens each, V vocabulary.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from dms_megatron.core.compression import achieved_cr
from dms_megatron.core.losses import token_kl
from dms_megatron.inference.engine import Engine, Session

StepFn = Callable[[int, Session, torch.Tensor], None]  # (position t just fed, session, next-token logits [B, V])


def feed(engine: Engine, sequences: Sequence[Sequence[int]], on_step: Optional[StepFn] = None,
         keep_logits: bool = False):
    """Feed equal-length ``sequences`` [B][L] token by token; ``on_step(t, session, logits)`` after each position.
    Returns (session, logits [B, L, V] fp32 when ``keep_logits`` else the last position's [B, V])."""
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"stream: sequences must be non-empty and of one length (got lengths {sorted(lengths)})")
    ids = torch.tensor([list(s) for s in sequences], dtype=torch.long)  # [B, L]
    session = engine.new_session(ids.shape[0])
    rows = list(range(ids.shape[0]))
    last = torch.stack([engine.prefill(session, r, ids[r, :1])[-1] for r in rows])  # [B, V]
    kept = [last.float()] if keep_logits else None
    if on_step is not None:
        on_step(0, session, last)
    for t in range(1, ids.shape[1]):
        last = engine.decode(session, rows, ids[:, t].tolist())
        if keep_logits:
            kept.append(last.float())
        if on_step is not None:
            on_step(t, session, last)
    return session, (torch.stack(kept, dim=1) if keep_logits else last)


def stream(engine: Engine, sequences: Sequence[Sequence[int]], on_step: Optional[StepFn] = None,
           keep_logits: bool = False):
    """``feed``, returning (engine summaries [B], logits [B, L, V] fp32 when ``keep_logits`` else None)."""
    session, logits = feed(engine, sequences, on_step, keep_logits)
    return engine.summary(session), (logits if keep_logits else None)


def _mean(rows: List[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def pooled_cr(rows: List[dict]) -> float:
    """core.compression's achieved CR over all sequences of engine summaries (slots and kept slots summed)."""
    return achieved_cr(sum(r["kept_slots"] for r in rows), sum(r["vanilla_resident"] for r in rows))


def stated_position(ids: Sequence[int], answer_pos: int) -> Optional[int]:
    """Where the answer at ``answer_pos`` was stated: the last earlier position holding the same token, or None."""
    tok = ids[answer_pos]
    for i in range(answer_pos - 1, -1, -1):
        if ids[i] == tok:
            return i
    return None


def resident(session: Session, row: int, position: int) -> torch.Tensor:
    """bool [layers, ng]: whether the token at ``position`` of sequence ``row`` is held by each layer and KV head."""
    return torch.stack([(c.pos[row] == position).any(-1) for c in session.caches])  # c.pos [B, ng, cap]


class RecallProbe:
    """Collects, at every answer position of teacher-forced items, the hit and the residency of the statement."""

    def __init__(self, items: List[dict]):
        self.items = items
        self.due: Dict[int, List[tuple]] = defaultdict(list)  # position t fed -> [(row, answer position)]
        for row, it in enumerate(items):
            for p in it["answers"]:
                self.due[p - 1].append((row, p))
        self.hits: List[bool] = []
        self.held: List[torch.Tensor] = []  # [layers, ng] per answer whose statement is found

    def __call__(self, t: int, session: Session, logits: torch.Tensor) -> None:
        for row, p in self.due.get(t, ()):
            ids = self.items[row]["ids"]
            self.hits.append(int(logits[row].argmax()) == ids[p])
            where = stated_position(ids, p)
            if where is not None:
                self.held.append(resident(session, row, where))

    def metrics(self) -> dict:
        out = {"recall_acc": sum(self.hits) / len(self.hits), "answers": len(self.hits)}
        if self.held and len(self.held) == len(self.hits):  # every answer was stated: residency rows align
            r = torch.stack(self.held)  # [answers, layers, ng]
            out["answer_resident"] = [round(float(x), 4) for x in r.float().mean(dim=(0, 2))]
            ok = torch.tensor(self.hits)

            def split(held: torch.Tensor) -> dict:
                return {name: (round(float(ok[m].float().mean()), 4) if int(m.sum()) else None)
                        for name, m in (("held", held), ("dropped", ~held))}

            out["recall_acc_by_residency"] = {"any_layer": split(r.flatten(1).any(-1)),
                                              **{f"layer{i}": split(r[:, i].any(-1)) for i in range(r.shape[1])}}
        return out


def recall_metrics(engine: Engine, items: List[dict]) -> dict:
    """Teacher-forced accuracy at every answer of held-out recall items ({"ids", "answers"}), with mean peak tokens
    and KV reads per item; items of one length stream as one batch.

    Where every answer was stated earlier: ``answer_resident`` [layers], the fraction of (answer, KV head) pairs
    whose cache still holds the statement's value when the question is asked, and ``recall_acc_by_residency``,
    accuracy split by whether some KV head of any layer / of each layer still holds it."""
    groups: Dict[int, List[dict]] = defaultdict(list)
    for it in items:
        groups[len(it["ids"])].append(it)
    probes, summaries = [], []
    for _, group in sorted(groups.items()):
        probe = RecallProbe(group)
        summ, _ = stream(engine, [it["ids"] for it in group], on_step=probe)
        probes.append(probe)
        summaries += summ
    merged = RecallProbe([])
    for p in probes:
        merged.hits += p.hits
        merged.held += p.held
    out = merged.metrics()
    out.update(peak_tokens=_mean(summaries, "peak_resident"), kv_reads=_mean(summaries, "kv_reads"),
               achieved_cr=pooled_cr(summaries), items=len(items))
    return out


def kl_metrics(engine: Engine, sequences: torch.Tensor, teacher_logits: torch.Tensor, bucket: int) -> dict:
    """Mean per-token KL(model || teacher) of next-token distributions on held-out ``sequences`` [B, L] (the
    direction the re-fit trains), its mean over the sequences per ``bucket`` consecutive positions
    (``kl_by_position``: where in the sequence a method loses), mean peak tokens and KV reads per sequence and the
    pooled achieved CR.
    teacher_logits [B, L, V]."""
    summ, logits = stream(engine, sequences.tolist(), keep_logits=True)
    per_pos = token_kl(torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits.float(), -1)).mean(0)  # [L]
    return {"kl": float(per_pos.mean()), "kl_by_position": [float(c.mean()) for c in per_pos.split(bucket)],
            "peak_tokens": _mean(summ, "peak_resident"), "kv_reads": _mean(summ, "kv_reads"),
            "achieved_cr": pooled_cr(summ)}


def teacher_logits(engine: Engine, sequences: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L, V] fp32 logits of the full-cache model (the KL reference)."""
    return stream(engine, sequences.tolist(), keep_logits=True)[1]


def budget_for(peak_tokens: float, layers: int, kv_heads: int) -> int:
    """Per (sequence, layer, KV head) token budget of a baseline matched to a DMS peak (summed over layers and KV
    heads). Rounded up: a baseline never gets less memory than DMS used."""
    return max(1, math.ceil(peak_tokens / (layers * kv_heads) - 1e-9))


def reads_budget_for(kv_reads: float, layers: int, kv_heads: int, length: int) -> int:
    """Per (sequence, layer, KV head) read budget B of a method that keeps the whole cache and reads at most B tokens
    a step (Quest), matched to a KV-read total: the smallest B whose reads over a streamed sequence of ``length``
    tokens (decode steps see 2 .. length tokens, reading min(B, t)) reach ``kv_reads`` / (layers x KV heads)."""
    target = kv_reads / (layers * kv_heads)

    def reads(b: int) -> int:
        return sum(min(b, t) for t in range(2, length + 1))

    lo, hi = 1, max(1, length)
    while lo < hi:
        mid = (lo + hi) // 2
        if reads(mid) >= target - 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return lo


__all__ = ["feed", "stream", "pooled_cr", "stated_position", "resident", "RecallProbe", "recall_metrics", "kl_metrics",
           "teacher_logits", "budget_for", "reads_budget_for"]

"""W sampled chains per question after one shared prompt, and the (L, W) grid of accuracy and budgets they give.

``sample_widths`` feeds the prompts token by token (every method makes its keep/evict choices online, as in
``harness.stream``), then for each width W forks the prefilled cache into W copies per question and samples up to
``max_tokens`` tokens per chain as one batch (N questions x W chains). A chain ends when it writes a stop token (a
value symbol: its answer; or EOS). Per chain it records the tokens, the KV entries held after the prompt and after
every decode step, the entries each decode step read, and the measured seconds of each batched decode step.

Every grid point (L, W) is read off the width-W run: a length budget L keeps the first L tokens of each chain (a
chain that has not answered by then has no answer) and the first L - 1 decode steps (the L-th token is sampled
from the logits of step L - 1 and never fed). Budgets are per question (its W chains): peak entries held at once
(``budget.batch_peak``; the prompt's cache counted once per chain), KV entries read during generation, the modeled
latency of its decode steps (``budget.batch_latency``) and the measured decode seconds per question (batched steps
divided by the N questions). The shared prompt's feed is the same for every (L, W) of a method and is not counted.

  N questions, W chains, T = max_tokens - 1 decode steps, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set

import torch

from dms_megatron.eval.budget import Hardware, batch_latency, batch_peak, batch_reads, vote_accuracy
from dms_megatron.eval.harness import feed
from dms_megatron.inference.engine import Engine, Session


@dataclass
class ChainRun:
    """One method's W chains for N questions."""

    tokens: torch.Tensor    # [N, W, max_tokens] long, -1 after a chain ended
    resident: torch.Tensor  # [N, W, T + 1] entries held after the prompt / after decode step t
    reads: torch.Tensor     # [N, W, T] entries read by decode step t (0 once ended)
    active: torch.Tensor    # [N, W, T] bool: the chain was fed a token at decode step t
    step_seconds: List[float]  # [T] measured seconds of each batched decode step (0 when none ran)


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen)[:, 0]


def sample_chains(engine: Engine, prefilled: Session, last: torch.Tensor, width: int, max_tokens: int,
                  temperature: float, stop: Set[int], seed: int) -> ChainRun:
    """``width`` chains per question continuing ``prefilled`` (N questions; last [N, V] the prompts' next-token
    logits); ``prefilled`` is not changed."""
    n = prefilled.batch
    session = engine.fork(prefilled, width)
    b, steps = n * width, max_tokens - 1
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.full((b, max_tokens), -1, dtype=torch.long)
    resident = torch.zeros(b, steps + 1, dtype=torch.long)
    reads = torch.zeros(b, steps, dtype=torch.long)
    active = torch.zeros(b, steps, dtype=torch.bool)
    seconds = [0.0] * steps
    resident[:, 0] = torch.tensor([m.resident for m in session.metrics])
    alive, logits = torch.arange(b), last.repeat_interleave(width, 0)
    stop_t = torch.tensor(sorted(stop), dtype=torch.long)
    for t in range(max_tokens):
        picked = _pick(logits, temperature, gen)
        tokens[alive, t] = picked
        go = ~torch.isin(picked, stop_t)
        if t == steps or not bool(go.any()):
            resident[:, t + 1:] = resident[:, t:t + 1]
            break
        alive, picked = alive[go], picked[go]
        before = torch.tensor([session.metrics[r].kv_reads for r in alive.tolist()])
        t0 = time.perf_counter()
        logits = engine.decode(session, alive.tolist(), picked.tolist())
        seconds[t] = time.perf_counter() - t0
        reads[alive, t] = torch.tensor([session.metrics[r].kv_reads for r in alive.tolist()]) - before
        active[alive, t] = True
        resident[:, t + 1] = torch.tensor([m.resident for m in session.metrics])
    shape = (n, width)
    return ChainRun(tokens.view(*shape, -1), resident.view(*shape, -1), reads.view(*shape, -1),
                    active.view(*shape, -1), seconds)


def sample_widths(engine: Engine, prompts: Sequence[Sequence[int]], widths: Sequence[int], max_tokens: int,
                  temperature: float, stop: Set[int], seed: int) -> Dict[int, ChainRun]:
    """One shared token-by-token prefill of the (equal-length) prompts, then a ``ChainRun`` per width (seeded by
    ``seed`` and the width)."""
    session, last = feed(engine, prompts)
    return {w: sample_chains(engine, session, last, w, max_tokens, temperature, stop, seed * 1009 + w)
            for w in widths}


def chain_answer(tokens: Sequence[int], length: int, answers: Set[int]) -> Optional[int]:
    """A chain's answer under a length budget: its first stop token among the first ``length`` tokens if that is
    an answer symbol (a value), else None (EOS, or no stop token yet)."""
    for t in list(tokens)[:length]:
        if t in answers:
            return int(t)
        if t < 0:
            break
    return None


def grid_rows(runs: Dict[int, ChainRun], truths: Sequence[int], lengths: Sequence[int], answers: Set[int],
              model_cfg, hw: Hardware) -> List[dict]:
    """One row per (L, W): majority-vote accuracy, pass@W, the share of chains that answered and the per-question
    budgets (means over questions; ``chain_steps``: decode steps summed over the W chains)."""
    rows = []
    for w, run in runs.items():
        n = run.tokens.shape[0]
        for length in lengths:
            steps = min(length, run.tokens.shape[-1]) - 1
            votes = [[chain_answer(run.tokens[i, j].tolist(), length, answers) for j in range(w)] for i in range(n)]
            acc, hit = vote_accuracy(votes, truths)
            rows.append({
                "length": length, "width": w, "accuracy": acc, "pass_at_w": hit,
                "answered": sum(a is not None for v in votes for a in v) / (n * w),
                "peak_tokens": sum(batch_peak(run.resident[i], steps) for i in range(n)) / n,
                "kv_reads": sum(batch_reads(run.reads[i], steps) for i in range(n)) / n,
                "chain_steps": float(run.active[:, :, :steps].sum()) / n,
                "latency_s": sum(batch_latency(model_cfg, run.reads[i], run.active[i], steps, hw)
                                 for i in range(n)) / n,
                "wall_s": sum(run.step_seconds[:steps]) / n})
    return rows


__all__ = ["ChainRun", "sample_chains", "sample_widths", "chain_answer", "grid_rows"]

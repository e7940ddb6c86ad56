"""Pre-training of the embedded tiny teacher: next-token prediction on stdlib text mixed with the recall tasks, with
the re-fit trainer's megatron optimizer and LR schedule (``training.optim``); seeded and reproducible per device.

  python tools/build_tiny_teacher.py --out DIR [--device cpu|cuda] [--steps N]

Curriculum (``phases``): short dense recall first: multi-query recall documents only, in short sequences with the
filler gaps scaled down and each example at the start of its sequence (a key-matching attention gets a usable
gradient only when the statements are among few candidates, and short sequences carry many more answers per step;
measured: with the example at a random offset instead, the first 500 steps reach 0.34 recall where at the start
300 steps reach 0.98); then longer sequences with wider gaps; then the full task in full-length sequences, each
example at a random offset, where ``recall_fraction`` of every batch is recall documents (``single_fraction`` of
them the single-value variant, ``chain_fraction`` chained recall with written hops) and the rest plain text. Every phase has the same tokens per step. Answer tokens
weigh ``answer_weight`` in the loss (a few tokens in 256 would otherwise be ignored).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from dms_megatron.config import TINY_TEACHER, ModelConfig, TrainConfig
from dms_megatron.data.recall import TASKS, RecallSpec, filler_from, make_task
from dms_megatron.megatron.compat import cuda_to_cpu_mode
from dms_megatron.megatron.model import build_gpt_model, transformer_config
from dms_megatron.progress import fmt_duration, rate_and_left
from dms_megatron.training.evaluation import lm_loss, recall_accuracy
from dms_megatron.training.optim import build_optimizer, build_scheduler, finalize_grads, wrap_ddp


@dataclass
class PretrainRecipe:
    """Everything that determines the teacher (with the tokenizer and the corpus)."""

    model: ModelConfig = field(default_factory=lambda: dataclasses.replace(TINY_TEACHER))
    steps: int = 6000
    batch_size: int = 16
    seq_length: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    answer_weight: float = 8.0
    # (first step after the phase, sequence length, batch size, gap scale); the last phase runs to the end
    phases: Tuple[Tuple[int, int, int, float], ...] = ((800, 64, 64, 0.0), (1600, 128, 32, 0.5))
    recall_fraction: float = 0.6
    single_fraction: float = 0.1
    chain_fraction: float = 0.35  # of the recall documents (full-task phase only), the rest multi-query recall
    seed: int = 1234

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, micro_batch_size=self.batch_size, global_batch_size=self.batch_size,
                           seq_length=self.seq_length, lr=self.lr, min_lr=self.min_lr,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, seed=self.seed,
                           precision="fp32")


def scaled_spec(spec: RecallSpec, scale: float) -> RecallSpec:
    """``spec`` with its filler gaps scaled (at least one token of room each)."""
    def sc(r):
        return int(r[0] * scale), max(1, int(r[1] * scale))
    return dataclasses.replace(spec, gap=sc(spec.gap), tail=sc(spec.tail), prefix=sc(spec.prefix))


def phase_at(recipe: PretrainRecipe, step: int) -> Tuple[int, int, Optional[float]]:
    """(sequence length, batch size, gap scale or None for the full task) of the curriculum at ``step``."""
    for end, seq, batch, scale in recipe.phases:
        if step < end:
            return seq, batch, scale
    return recipe.seq_length, recipe.batch_size, None


class PretrainBatches:
    """Deterministic batches [b, s] (tokens, labels, loss weights) of the curriculum, from one seeded stream."""

    def __init__(self, tok, text_ids: List[int], recipe: PretrainRecipe):
        self.r = recipe
        self.rng = random.Random(recipe.seed)
        self.filler = filler_from(text_ids)(self.rng)
        self.tasks = {name: make_task(tok, name) for name in TASKS}

    def _row(self, n: int, scale: Optional[float]):
        r, rng = self.r, self.rng
        if scale is not None:
            task = self.tasks["mqar"]
            return task.document(rng, self.filler, n, scaled_spec(task.spec, scale), at_start=True)
        if rng.random() >= r.recall_fraction:
            return self.filler(n), []
        u = rng.random()
        name = "single" if u < r.single_fraction else "chain" if u < r.single_fraction + r.chain_fraction else "mqar"
        return self.tasks[name].document(rng, self.filler, n)

    def batch(self, step: int) -> dict:
        seq, size, scale = phase_at(self.r, step)
        rows, weights = [], []
        for _ in range(size):
            toks, answers = self._row(seq + 1, scale)
            w = torch.ones(seq)
            for a in answers:
                w[a - 1] = self.r.answer_weight  # position a - 1 predicts the answer ids[a]
            rows.append(toks)
            weights.append(w)
        d = torch.tensor(rows)
        return {"tokens": d[:, :-1], "labels": d[:, 1:], "weights": torch.stack(weights)}


def build_teacher(recipe: PretrainRecipe, device: torch.device):
    """(model, ddp, optimizer, scheduler) of a freshly initialised stock model (process groups must exist)."""
    torch.manual_seed(recipe.seed)
    cfg = transformer_config(recipe.model, precision=recipe.train_config().precision)
    model = build_gpt_model(recipe.model, None, seq_length=recipe.seq_length, config=cfg).to(device)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, recipe.train_config())
    return model, ddp, optimizer, build_scheduler(optimizer, recipe.train_config())


def train_step(ddp, optimizer, scheduler, batch: dict, vocab: int, device: torch.device) -> float:
    """One optimizer step of the answer-weighted next-token loss; returns the loss."""
    tokens, labels, weights = (batch[k].to(device) for k in ("tokens", "labels", "weights"))
    pos = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = lm_loss(ddp(tokens, pos, None)[..., :vocab], labels, weights)
    loss.backward()
    with cuda_to_cpu_mode():
        finalize_grads(ddp)
        optimizer.step()
    scheduler.step(1)
    return loss.item()


class ProgressMismatch(ValueError):
    """A progress file written by a build of another recipe."""


def _save_progress(path: Path, recipe: PretrainRecipe, step: int, model, optimizer, scheduler, batches,
                   history: list) -> None:
    """Everything the rest of the build depends on, after ``step`` steps, written atomically."""
    state = {"recipe": dataclasses.asdict(recipe), "step": step, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "batches_rng": batches.rng.getstate(), "history": history}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_progress(path: Path, recipe: PretrainRecipe, model, optimizer, scheduler, batches) -> tuple:
    """(steps done, history) from a progress file of the same recipe; (0, []) when there is none."""
    if not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["recipe"] != dataclasses.asdict(recipe):
        raise ProgressMismatch(f"{path} holds the progress of another recipe; delete it to start this one afresh")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    batches.rng.setstate(state["batches_rng"])
    return state["step"], state["history"]


def pretrain(recipe: PretrainRecipe, tok, text_ids: List[int], evals: dict, device: torch.device,
             log: Callable[[str], None] = print, eval_interval: int = 250, progress: Optional[Path] = None) -> tuple:
    """Train the teacher; returns (model, history). ``evals`` maps a name to held-out recall items scored every
    ``eval_interval`` steps. ``progress``: a file the state is saved to at every evaluation and resumed from (the
    resumed build is the uninterrupted one, bit for bit)."""
    model, ddp, optimizer, scheduler = build_teacher(recipe, device)
    batches = PretrainBatches(tok, text_ids, recipe)
    vocab, t0 = recipe.model.vocab_size, time.time()
    start, history = _load_progress(progress, recipe, model, optimizer, scheduler, batches) if progress else (0, [])
    if start:
        log(f"resuming from {progress} after {start} steps")
    for step in range(start, recipe.steps):
        loss = train_step(ddp, optimizer, scheduler, batches.batch(step), vocab, device)
        if (step + 1) % eval_interval == 0 or step + 1 == recipe.steps:
            row = {"step": step + 1, "loss": round(loss, 4), "seconds": round(time.time() - t0, 1)}
            row.update({f"recall_{k}": round(recall_accuracy(model, v, vocab, device), 4) for k, v in evals.items()})
            history.append(row)
            if progress:
                _save_progress(progress, recipe, step + 1, model, optimizer, scheduler, batches, history)
            _, left = rate_and_left(step + 1 - start, recipe.steps - start, time.time() - t0)
            log(" ".join(f"{k} {v}" for k, v in row.items()) + f" | {fmt_duration(left)} left")
    return model, history


__all__ = ["ProgressMismatch", "PretrainRecipe", "PretrainBatches", "scaled_spec", "phase_at", "pretrain", "build_teacher"]

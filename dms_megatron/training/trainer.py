"""The DMS re-fit trainer on megatron-core: frozen teacher -> DMS student distillation + compression loss.

``RefitTrainer(cfg, run_dir).run()`` goes through named stages, each a method:

  build       process groups, this rank's stage of the frozen teacher and of the DMS student, DDP, optimizer, LR
  resume      the latest checkpoint of the run dir, if any (model, optimizer, scheduler, RNG, data position)
  data        the train / valid datasets (the same samples on every rank)
  train_step  one optimizer step through megatron-core's forward-backward function (any tp x pp x dp layout)
  evaluate    every ``eval_interval`` steps: held-out KD and evicted fraction of the student under inference
              (hard) eviction, forward-only through the same schedule and layout, logged with the step
  checkpoint  an atomic dist-checkpoint of the student (every ``save_interval`` steps, at the end, on preemption)
  report      the end-of-run numbers (held-out KL, achieved CR, teacher and student recall), forward-only through
              the same schedule and layout on every rank; rank 0 writes report.json (with every rank's host memory:
              resident set before / after the build stage and peak, ``training.memory``) and refit.png

Runs in every rank (one process, local processes started by dms-refit, torchrun or srun); never imports Hydra. ``TrainerHooks`` is the explicit test hook
(gradients after backward, a transformed loss, a callback after each step).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from dms_megatron.checkpoint import AsyncSaves, latest_iteration, load_checkpoint, read_extra, save_checkpoint
from dms_megatron.config import ConfigError, RefitConfig
from dms_megatron.convert.hf_io import iter_side_files, read_config
from dms_megatron.convert.hf_model import is_hf_dir
from dms_megatron.convert.workflows import ASSETS
from dms_megatron.core.compression import cr_from_evicted_fraction
from dms_megatron.core.losses import (band_lower_fraction, band_upper_fraction, compression_loss, cr_at_step,
                                      target_evicted_fraction)
from dms_megatron.data.indexed import collate
from dms_megatron.data.recall import read_items
from dms_megatron.megatron.compat import cuda_to_cpu_mode
from dms_megatron.megatron.distributed import init_process_groups, rank
from dms_megatron.megatron.model import build_gpt_model, params_dtype, transformer_config
from dms_megatron.megatron.parallel_loss import global_mean_fraction, layer_fraction_vector, vocab_parallel_kd_loss
from dms_megatron.megatron.pipeline import DistillationStage, pipeline_micro_batch_size
from dms_megatron.megatron.runtime import DMSRuntime
from dms_megatron.training.logger import MetricsLogger
from dms_megatron.training.heldout import RECALL_KEYS, recall_counts, recall_micro_batches
from dms_megatron.training.memory import gather_per_rank, peak_rss_bytes, rss_bytes
from dms_megatron.training.metrics import dp_mean, step_metrics, summed, with_achieved_cr
from dms_megatron.training.optim import build_optimizer, build_scheduler, wrap_ddp
from dms_megatron.training.preflight import Checked, preflight
from dms_megatron.training.preemption import Preempted, PreemptionHandler
from dms_megatron.training.report import write_report
from dms_megatron.training.weights import check_teacher, load_init_weights
from dms_megatron.progress import say


def _batch(ds, ids) -> dict:
    """One micro batch of dataset items ``ids``; its sample ids (the Gumbel noise keys) are the global indices."""
    ids = list(ids)
    b = collate([ds[i] for i in ids])
    b["sample_ids"] = torch.tensor(ids)
    return b


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainerHooks:
    """Test hooks, each given the 1-based number of the optimizer step it runs in. after_backward(step, ddp): the
    reduced gradients before the update; loss(step, loss) -> loss: replaces a micro batch's loss (e.g. NaN
    injection); after_step(step, metrics): after the step is logged."""

    after_backward: Optional[Callable] = None
    loss: Optional[Callable] = None
    after_step: Optional[Callable] = None


class RefitTrainer:
    def __init__(self, cfg: RefitConfig, run_dir, hooks: Optional[TrainerHooks] = None, log=say,
                 checked: Optional[Checked] = None):
        """``checked``: the launcher's pre-flight of ``cfg`` (``training.preflight``); without it the build stage
        runs it."""
        self.cfg, self.run_dir, self.hooks, self.log = cfg, Path(run_dir), hooks or TrainerHooks(), log
        self.checked = checked
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.start = 0
        self._evaluated: Optional[tuple] = None  # (step, metrics) of the latest evaluate stage
        self.async_saves = AsyncSaves() if cfg.train.async_save else None

    # ---- the whole run --------------------------------------------------------------------------------------
    def run(self, report: bool = True) -> dict:
        """Train, checkpoint and (``report``) evaluate on every rank. Returns the report dict on rank 0, else {}."""
        self.build()
        self.resume()
        self.data()
        self.logger = MetricsLogger(self.run_dir, self.cfg, start_step=self.start, enabled=rank() == 0)
        preempt = PreemptionHandler().install()
        try:
            for step in range(self.start, self.cfg.train.steps):
                metrics = self.train_step(step)
                if self.async_saves is not None:  # a background save that finished becomes latest
                    self.async_saves.finalize(blocking=False)
                if self.cfg.train.eval_interval and (step + 1) % self.cfg.train.eval_interval == 0:
                    metrics.update(self.evaluate(step + 1))
                self.logger.log(metrics)
                if self.hooks.after_step is not None:
                    self.hooks.after_step(step + 1, metrics)
                if (step + 1) % self.cfg.train.save_interval == 0 or step + 1 == self.cfg.train.steps:
                    self.checkpoint(step + 1)
                self._maybe_stop(step + 1, preempt)
            self._finish_saves()
        finally:
            preempt.uninstall()
            self.logger.close()
        return self.report() if report else {}

    # ---- stages ---------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, t, p = self.cfg, self.cfg.train, self.cfg.parallel
        log = self.log if rank() == 0 else lambda m: None
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
        # the inputs and the layout, checked before any process group exists
        checked = (self.checked or preflight(cfg, world, build=True, log=log)).for_world(world).built(log)
        self.inputs, self.dp = checked.inputs, checked.dp
        self.model_config = self.inputs.model_config
        self.tp, self.pp = p.tp, p.pp
        init_process_groups(p.tp, p.pp, seed=t.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        torch.manual_seed(t.seed)
        self.memory = {"rss_before_build_bytes": rss_bytes()}  # this rank's host memory, for report.json
        self.teacher, self.student = self._build_models()
        self.ddp = wrap_ddp(DistillationStage(self.teacher, self.student), t.distributed_optimizer)
        self.optimizer = build_optimizer(self.ddp, t, params_dtype(t.precision))
        self.scheduler = build_scheduler(self.optimizer, t)
        self.memory["rss_after_build_bytes"] = rss_bytes()
        self.hf_config = self._carry_hf_metadata()

    def _build_models(self):
        cfg, mc, p = self.cfg, self.model_config, self.cfg.parallel

        def tcfg():
            return transformer_config(mc, tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel,
                                      precision=cfg.train.precision)

        seq = cfg.train.seq_length
        teacher = build_gpt_model(mc, None, seq_length=seq, config=tcfg())
        load_init_weights(self.inputs.init, teacher, mc)
        check_teacher(teacher, mc.vocab_size)
        teacher.eval().requires_grad_(False)
        student = build_gpt_model(mc, cfg.dms, seq_length=seq, config=tcfg())
        load_init_weights(self.inputs.init, student, mc, allow_missing=("dms_alpha",))
        if cfg.train.mode == "adapter":
            for n, prm in student.named_parameters():
                prm.requires_grad_("dms_alpha" in n)
        return teacher, student

    def resume(self) -> None:
        if latest_iteration(self.ckpt_dir) is None:
            return
        gbs = self.cfg.train.global_batch_size
        self.start, saved = load_checkpoint(self.ckpt_dir, self.ddp, self.optimizer, self.scheduler)
        # data position: step s reads global samples [s * gbs, (s + 1) * gbs), so it follows from the step as long as
        # the global batch size is unchanged
        consumed = saved.get("consumed_samples", self.start * gbs)
        if consumed != self.start * gbs:
            raise ConfigError(f"{self.ckpt_dir} was written after {consumed} samples in {self.start} steps, but "
                              f"train.global_batch_size={gbs}: resume with the original batch size or start a new "
                              f"run dir")
        if rank() == 0:
            self.log(f"resumed from {self.ckpt_dir} at step {self.start}")

    def data(self) -> None:
        self.train_ds, self.valid_ds = self.inputs.datasets(self.cfg, self.run_dir)

    def micro_batches(self, step: int):
        """This data-parallel rank's micro batches of one optimizer step; sample ids are global dataset indices."""
        t = self.cfg.train
        per_rank = t.global_batch_size // self.dp
        first = step * t.global_batch_size + self.dp_rank * per_rank
        for m in range(per_rank // t.micro_batch_size):
            yield _batch(self.train_ds, range(first + m * t.micro_batch_size, first + (m + 1) * t.micro_batch_size))

    def valid_micro_batches(self):
        """This data-parallel rank's share (at least one) of the first ``train.eval_batches`` held-out micro
        batches; the same samples under any tp x pp layout."""
        t = self.cfg.train
        per_rank = max(1, math.ceil(t.eval_batches / self.dp))
        n = len(self.valid_ds)
        for m in range(per_rank):
            first = (self.dp_rank * per_rank + m) * t.micro_batch_size
            yield _batch(self.valid_ds, [i % n for i in range(first, first + t.micro_batch_size)])

    def _schedule(self, forward_step, batches, num_micro: int, forward_only: bool) -> list:
        """megatron-core's forward-backward function over ``num_micro`` micro batches of this rank (any layout);
        the last pipeline stage's per-micro-batch loss dicts."""
        t = self.cfg.train
        with cuda_to_cpu_mode():
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=batches, model=[self.ddp], num_microbatches=num_micro,
                seq_length=t.seq_length, forward_only=forward_only,
                micro_batch_size=pipeline_micro_batch_size(t.micro_batch_size) if self.pp > 1 else t.micro_batch_size)

    def forward_step_func(self, step: int, target: float, layer_fracs: list, mode: str = "train", score=None):
        """megatron's ``forward_step_func`` for one optimizer step (``mode`` "train") or one evaluation ("hard":
        inference eviction, no noise): (data_iterator, model) -> (output, loss_func). Appends each micro batch's
        per-layer evicted fractions to ``layer_fracs``. ``score(output, batch)`` -> (loss, values) replaces the
        loss (the recall count of the report stage). A batch's real tokens are its ``valid`` entry, else the
        loss-mask positions and EOS tokens (the rest is padding)."""
        cfg, mc = self.cfg, self.model_config

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            valid = b["valid"] if "valid" in b else (b["loss_mask"] > 0) | (b["tokens"] == self.inputs.eos_id)
            rt = DMSRuntime(mode=mode, seed=cfg.train.seed, step=step, sample_ids=b["sample_ids"], valid=valid,
                            record_flags=False)
            out = model(b["tokens"], b["position_ids"], None, runtime=rt)
            layer_fracs.append(layer_fraction_vector(rt.fractions, mc.num_layers))
            if score is not None:
                return out, lambda output: score(output, b)
            keys = valid.sum(-1)  # real keys per sample (core.compression's key slots per layer and KV head)
            return out, lambda output: self.loss(step, output, b["loss_mask"], target, hooked=mode == "train",
                                                 keys=keys)

        return forward_step

    def loss(self, step: int, output, loss_mask, target: float, hooked: bool = True, keys=None):
        """KD + compression loss of one micro batch on the last pipeline stage; (loss, reported values)."""
        s_logits, t_logits, frac_sum = output  # logits [b, s, V/tp]; frac_sum [b] over all stages
        t = self.cfg.train
        kd = vocab_parallel_kd_loss(s_logits, t_logits, self.model_config.vocab_size, loss_mask, t.kd_direction)
        frac = global_mean_fraction(frac_sum, self.model_config.num_layers, self.tp)
        comp = compression_loss(frac, *self.charged_range(target))
        loss = kd + t.compression_weight * comp
        if hooked and self.hooks.loss is not None:
            loss = self.hooks.loss(step + 1, loss)
        return loss, {"loss": loss.detach().clone(), "kd_loss": kd.detach(), "compression_loss": comp.detach(),
                      **self._slot_counts(frac, keys)}

    def _slot_counts(self, frac, keys) -> dict:
        """Evicted and total key slots (core.compression) of a micro batch from its per-sample evicted fraction
        over all layers and KV heads, ``frac`` [b], and its real keys per sample, ``keys`` [b]."""
        mc = self.model_config
        keys = torch.ones_like(frac) if keys is None else keys.to(frac.dtype)
        per_key = mc.num_layers * mc.num_query_groups
        return {"evicted_slots": float((frac.detach() * keys).sum()) * per_key, "slots": float(keys.sum()) * per_key}

    def charged_range(self, target: float) -> tuple:
        """(lower, upper) evicted fractions outside which the compression loss charges at the scheduled ``target``:
        (target, None) for the paper's one-sided loss; the fractions of CR x (1 -/+ cr_band) for the band loss."""
        d = self.cfg.dms
        if d.cr_loss != "band":
            return target, None
        cr = cr_from_evicted_fraction(target)
        return band_lower_fraction(cr, d.cr_band), band_upper_fraction(cr, d.cr_band)

    def train_step(self, step: int) -> dict:
        t, d = self.cfg.train, self.cfg.dms
        t0 = time.perf_counter()
        target = target_evicted_fraction(cr_at_step(step, d.initial_cr, d.final_cr, d.final_step))
        num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)
        layer_fracs: list = []
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        reduced = self._schedule(self.forward_step_func(step, target, layer_fracs), self.micro_batches(step),
                                 num_micro, forward_only=False)
        metrics = with_achieved_cr(dp_mean(step_metrics(reduced, sum(layer_fracs) / num_micro, self.tp)),
                                   "achieved_cr_train")
        if not math.isfinite(metrics["loss"]):
            raise TrainingDiverged(f"loss is {metrics['loss']} at step {step}; stopped, the last good checkpoint in "
                                   f"{self.ckpt_dir} is kept")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies (the scheduler moves it after)
        if self.hooks.after_backward is not None:
            self.hooks.after_backward(step + 1, self.ddp)
        with cuda_to_cpu_mode():
            _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        dt = time.perf_counter() - t0
        metrics.update(step=step + 1, target_fraction=target, target_cr=cr_from_evicted_fraction(target),
                       lr=lr,
                       grad_norm=float(grad_norm or 0.0), tokens_per_s=t.global_batch_size * t.seq_length / dt)
        return metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Held-out metrics of the student after ``step`` steps, equal on every rank: ``valid/kd_loss`` (KL to the
        teacher per token with inference eviction), ``valid/evicted_fraction`` and ``valid/achieved_cr`` (hard
        decisions over all layers, KV heads and non-padding positions)."""
        batches = list(self.valid_micro_batches())
        layer_fracs: list = []
        reduced = self._forward_only(self.forward_step_func(step, 0.0, layer_fracs, mode="hard"), batches)
        m = with_achieved_cr(dp_mean(step_metrics(reduced, sum(layer_fracs) / len(batches), self.tp)))
        out = {"valid/kd_loss": m["kd_loss"], "valid/evicted_fraction": m["evicted_fraction"],
               "valid/achieved_cr": m["achieved_cr"]}
        if rank() == 0:
            self.log(f"eval at step {step}: held-out KD {out['valid/kd_loss']:.4f} nats/token, CR "
                     f"{out['valid/achieved_cr']:.2f} (inference eviction, {len(batches) * self.dp} micro batches)")
        self._evaluated = (step, out)
        return out

    def _forward_only(self, forward_step, batches: list) -> list:
        """The schedule forward-only over this rank's ``batches`` with the student in eval mode."""
        self.ddp.train(False)
        try:
            return self._schedule(forward_step, iter(batches), len(batches), forward_only=True)
        finally:
            self.ddp.train(True)

    @torch.no_grad()
    def recall(self) -> dict:
        """Teacher-forced greedy accuracy of teacher and student (inference eviction) at every answer of the
        held-out recall items, forward-only through the training layout; equal on every rank."""
        t, vocab = self.cfg.train, self.model_config.vocab_size
        items = read_items(self.inputs.recall_eval, t.recall_eval_limit)
        batches = recall_micro_batches(items, t.seq_length, t.micro_batch_size, self.dp_rank, self.dp)

        def score(output, b):
            return output[0].new_zeros(()), recall_counts(output[0], output[1], b, vocab)

        n = summed(self._forward_only(self.forward_step_func(t.steps, 0.0, [], mode="hard", score=score), batches),
                   RECALL_KEYS)
        answers = max(n["answers"], 1.0)
        return {"teacher_recall_acc": n["teacher_correct"] / answers,
                "student_recall_acc": n["student_correct"] / answers, "recall_answers": int(n["answers"])}

    def checkpoint(self, step: int) -> None:
        extra = {"model_config": asdict(self.model_config), "dms_config": asdict(self.cfg.dms),
                 "refit_config": self.cfg.to_dict(), "consumed_samples": step * self.cfg.train.global_batch_size}
        if self.hf_config is not None:
            extra["hf_config"] = self.hf_config
        save_checkpoint(self.ckpt_dir, step, self.ddp, self.optimizer, self.scheduler, extra=extra,
                        async_saves=self.async_saves, dist_optim_sharding=self.cfg.train.dist_optim_sharding)

    def _finish_saves(self) -> None:
        """Wait for a background save and make it ``latest`` (before exit: nothing is left half-written)."""
        if self.async_saves is not None:
            self.async_saves.finalize(blocking=True)

    def _maybe_stop(self, step: int, preempt: PreemptionHandler) -> None:
        """Every rank agrees (all-reduce) whether any was signalled; then all checkpoint this step and stop."""
        if step < self.cfg.train.steps and preempt.requested():
            self._finish_saves()
            if latest_iteration(self.ckpt_dir) != step:
                self.checkpoint(step)
                self._finish_saves()
            raise Preempted(step, self.ckpt_dir, preempt.received)

    def report(self) -> dict:
        """The report stage, on every rank at the training layout: held-out KL and achieved CR after the last step
        (the evaluate stage's, reused when the run has just evaluated that step) and, where the task has answers,
        teacher and student recall, and every rank's host memory (gathered). Rank 0 writes report.json and refit.png
        and returns the report; others {}."""
        steps = self.cfg.train.steps
        ev = self._evaluated[1] if self._evaluated and self._evaluated[0] == steps else self.evaluate(steps)
        recall = self.recall() if self.inputs.recall_eval else None
        memory = gather_per_rank({**self.memory, "peak_rss_bytes": peak_rss_bytes()})
        if rank() != 0:
            return {}
        return write_report(self.run_dir, self.cfg, ev, recall, self.logger.history(), memory)

    def _carry_hf_metadata(self) -> Optional[dict]:
        """What ``dms-convert export`` needs from an imported teacher: its HF config (returned, saved in every
        checkpoint's extra state) and its tokenizer / generation files (copied to ``checkpoints/<ASSETS>``)."""
        init = Path(self.inputs.init)
        hf = read_config(init) if is_hf_dir(init) else read_extra(init).get("hf_config")
        sides = list(iter_side_files(init)) if is_hf_dir(init) else (
            sorted((init / ASSETS).iterdir()) if (init / ASSETS).is_dir() else [])
        dest = self.ckpt_dir / ASSETS
        if sides and rank() == 0 and not dest.exists():
            tmp = self.ckpt_dir / ".hf_assets.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in sides:
                shutil.copy2(f, tmp / f.name)
            os.replace(tmp, dest)
        return hf


__all__ = ["RefitTrainer", "TrainerHooks", "TrainingDiverged"]

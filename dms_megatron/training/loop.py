"""The DMS re-fitting loop on megatron-core: frozen teacher -> DMS student distillation + compression loss.

Runs in every rank (single process or torchrun). Reads a validated ``RefitConfig``; never imports Hydra.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from dms_megatron.config import ConfigError, DMSConfig, ModelConfig
from dms_megatron.core.losses import compression_loss, cr_at_step, target_evicted_fraction
from dms_megatron.training.config import RefitConfig
from dms_megatron.training.preemption import Preempted, PreemptionHandler


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


ARCH_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "vocab_size", "add_qkv_bias", "qk_layernorm", "tie_embeddings")


def _check_same_arch(a: ModelConfig, b: ModelConfig, where: str) -> None:
    diff = [f"{f}: config {getattr(a, f)} vs {where} {getattr(b, f)}" for f in ARCH_FIELDS
            if getattr(a, f) != getattr(b, f)]
    if diff:
        raise ConfigError(f"model config does not match {where}: " + "; ".join(diff))


class Resolved:
    """Concrete data/teacher locations for a run (embedded default or user-provided)."""

    def __init__(self, cfg: RefitConfig):
        from dms_megatron.data.indexed import check_prefix, max_token_id
        from dms_megatron.data.tokenizer import load_tokenizer
        from dms_megatron.training.checkpointing import read_extra

        if cfg.embedded:
            from dms_megatron.data.embedded import ensure_tiny_teacher

            from dms_megatron.megatron.distributed import outside_torchrun

            with outside_torchrun():  # a first build pretrains in this process alone, before the job's groups
                a = ensure_tiny_teacher(quiet=_rank() != 0)
            self.model_config = a.model_config
            self.train_prefix, self.valid_prefix = a.train_prefix, a.valid_prefix
            self.tokenizer_dir, self.recall_eval = a.tokenizer_dir, a.recall_eval
            self.init_checkpoint = a.teacher_checkpoint
            self.eos_id, self.pad_id = a.eos_id, a.pad_id
            self.teacher_info = a.info
        else:
            self.init_checkpoint = Path(cfg.train.init_checkpoint)
            extra = read_extra(self.init_checkpoint)
            if "model_config" not in extra:
                raise ConfigError(f"{self.init_checkpoint} does not record its model_config")
            self.model_config = ModelConfig(**extra["model_config"])
            self.train_prefix = check_prefix(cfg.data.train_prefix, "data.train_prefix")
            self.valid_prefix = check_prefix(cfg.data.valid_prefix, "data.valid_prefix")
            self.tokenizer_dir = cfg.data.tokenizer
            self.recall_eval = cfg.data.recall_eval
            self.teacher_info = {}
        _check_same_arch(cfg.model, self.model_config, f"the teacher checkpoint {self.init_checkpoint}")
        tok = load_tokenizer(self.tokenizer_dir)
        if not cfg.embedded:
            self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else 0
        if len(tok) > self.model_config.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer_dir} has {len(tok)} tokens but the model vocabulary is "
                              f"{self.model_config.vocab_size}: wrong tokenizer for this model")
        for prefix in (self.train_prefix, self.valid_prefix):
            m = max_token_id(prefix)
            if m >= self.model_config.vocab_size:
                raise ConfigError(f"{prefix}.bin holds token id {m} >= model vocab {self.model_config.vocab_size}: "
                                  f"data was tokenized with another tokenizer")


def _fault(step: int) -> str:
    """Fault injection for resilience tests: DMS_FAULT_INJECT="kill@N" (SIGKILL this process after logging step N)
    or "nan@N" (make step N's loss NaN). Unset in normal runs."""
    spec = os.environ.get("DMS_FAULT_INJECT", "")
    if "@" not in spec:
        return ""
    kind, at = spec.split("@", 1)
    return kind if int(at) == step else ""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def _check_teacher(model) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"teacher weight {name} has NaN/inf values after loading")
        if name.endswith("word_embeddings.weight") and float(p.detach().float().std()) == 0.0:
            raise ConfigError(f"teacher weight {name} is constant after loading: the checkpoint looks empty")


def _batches(dataset, step: int, gbs: int, mbs: int, dp_rank: int, dp: int):
    """Micro-batches of one optimizer step for one data-parallel rank; sample ids are global dataset indices."""
    from dms_megatron.data.indexed import collate

    per_rank = gbs // dp
    first = step * gbs + dp_rank * per_rank
    for m in range(per_rank // mbs):
        ids = list(range(first + m * mbs, first + (m + 1) * mbs))
        b = collate([dataset[i] for i in ids])
        b["sample_ids"] = torch.tensor(ids)
        yield b


def run_refit(cfg: RefitConfig, run_dir: Path, *, report: bool = True,
              after_backward: Optional[Callable] = None) -> dict:
    """Train, checkpoint and report. Returns the report dict (rank 0) or {}.

    Any layout tp x pp x dp (world size = tp * pp * dp, from torchrun's environment). ``report=False`` skips the
    end-of-run evaluation; ``after_backward(step, ddp)`` (tests) sees the reduced gradients before each update.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dms_megatron.megatron.compat import cuda_to_cpu_mode
    from dms_megatron.megatron.distributed import init_process_groups, validate_model_layout
    from dms_megatron.megatron.model import build_gpt_model, transformer_config
    from dms_megatron.megatron.pipeline import DistillationStage, pipeline_micro_batch_size
    from dms_megatron.megatron.runtime import DMSRuntime
    from dms_megatron.training.checkpointing import latest_iteration, load_checkpoint, load_model_weights, \
        save_checkpoint
    from dms_megatron.training.logger import MetricsLogger
    from dms_megatron.training.optim import build_optimizer, build_scheduler, wrap_ddp
    from dms_megatron.training.parallel_loss import global_mean_fraction, layer_fraction_vector, \
        vocab_parallel_kd_loss
    from dms_megatron.training.parallel_metrics import report_from_checkpoint, step_metrics
    from dms_megatron.training.report import write_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _rank() == 0 and not (run_dir / "config.yaml").exists():  # the launcher writes it; direct calls too
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t_cfg, p_cfg = cfg.train, cfg.parallel
    tp, pp = p_cfg.tp, p_cfg.pp
    res = Resolved(cfg)
    mc = res.model_config
    vocab = mc.vocab_size
    try:  # the layout must fit the model and the world before any process group exists
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
        dp = validate_model_layout(mc, tp, pp, world,
                                   sequence_parallel=p_cfg.sequence_parallel, seq_length=t_cfg.seq_length)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t_cfg.global_batch_size % (t_cfg.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size={t_cfg.global_batch_size} must be a multiple of "
                          f"train.micro_batch_size * data-parallel size = {t_cfg.micro_batch_size} * {dp}")
    init_process_groups(tp, pp, seed=t_cfg.seed)
    dp_rank = parallel_state.get_data_parallel_rank()

    # ---- models: this rank's stage of the frozen teacher and of the DMS student -------------------------------
    torch.manual_seed(t_cfg.seed)

    def tcfg():
        return transformer_config(mc, tp=tp, pp=pp, sequence_parallel=p_cfg.sequence_parallel)

    teacher = build_gpt_model(mc, None, seq_length=t_cfg.seq_length, config=tcfg())
    load_model_weights(res.init_checkpoint, teacher)
    _check_teacher(teacher)
    teacher.eval().requires_grad_(False)
    student = build_gpt_model(mc, cfg.dms, seq_length=t_cfg.seq_length, config=tcfg())
    load_model_weights(res.init_checkpoint, student, allow_missing=("dms_alpha",))
    if t_cfg.mode == "adapter":
        if cfg.dms.alpha_source != "adapter":
            raise ConfigError("train.mode=adapter trains only the DMS adapter: set dms.alpha_source=adapter")
        for n, p in student.named_parameters():
            p.requires_grad_("dms_alpha" in n)
    ddp = wrap_ddp(DistillationStage(teacher, student))
    optimizer = build_optimizer(ddp, t_cfg)
    scheduler = build_scheduler(optimizer, t_cfg)

    ckpt_dir = run_dir / "checkpoints"
    start = 0
    if latest_iteration(ckpt_dir) is not None:
        start, saved = load_checkpoint(ckpt_dir, ddp, optimizer, scheduler)
        # data position: step s reads global samples [s * gbs, (s + 1) * gbs), so it follows from the step as
        # long as the global batch size is unchanged
        consumed = saved.get("consumed_samples", start * t_cfg.global_batch_size)
        if consumed != start * t_cfg.global_batch_size:
            raise ConfigError(f"{ckpt_dir} was written after {consumed} samples in {start} steps, but "
                              f"train.global_batch_size={t_cfg.global_batch_size}: resume with the original batch "
                              f"size or start a new run dir")
        if _rank() == 0:
            print(f"resumed from {ckpt_dir} at step {start}", flush=True)

    train_ds, valid_ds = build_datasets(cfg, res, run_dir)

    logger = MetricsLogger(run_dir, cfg, start_step=start, total_steps=t_cfg.steps, enabled=_rank() == 0)
    fwd_bwd = get_forward_backward_func()
    num_micro = t_cfg.global_batch_size // (t_cfg.micro_batch_size * dp)
    msg_batch = pipeline_micro_batch_size(t_cfg.micro_batch_size) if pp > 1 else t_cfg.micro_batch_size
    extra = {"model_config": asdict(mc), "dms_config": asdict(cfg.dms), "refit_config": cfg.to_dict()}
    _carry_hf_metadata(res.init_checkpoint, ckpt_dir, extra)
    preempt = PreemptionHandler().install()  # SIGUSR1/SIGTERM -> checkpoint + Preempted at the next step boundary
    try:
        for step in range(start, t_cfg.steps):
            t0 = time.perf_counter()
            target = target_evicted_fraction(cr_at_step(step, cfg.dms.initial_cr, cfg.dms.final_cr,
                                                        cfg.dms.final_step))
            layer_fracs = torch.zeros(mc.num_layers, dtype=torch.float64)

            def forward_step(data_iterator, model):
                nonlocal layer_fracs
                b = next(data_iterator)
                valid = (b["loss_mask"] > 0) | (b["tokens"] == res.eos_id)
                rt = DMSRuntime(mode="train", seed=t_cfg.seed, step=step, sample_ids=b["sample_ids"], valid=valid,
                                record_flags=False)
                out = model(b["tokens"], b["position_ids"], None, runtime=rt)
                layer_fracs = layer_fracs + layer_fraction_vector(rt.fractions, mc.num_layers)

                def loss_func(output):
                    s_logits, t_logits, frac_sum = output  # logits [b, s, V/tp]; frac_sum [b] over all stages
                    kd = vocab_parallel_kd_loss(s_logits, t_logits, vocab, b["loss_mask"], t_cfg.kd_direction)
                    frac = global_mean_fraction(frac_sum, mc.num_layers, tp)
                    comp = compression_loss(frac, target)
                    loss = kd + t_cfg.compression_weight * comp
                    if _fault(step + 1) == "nan":
                        loss = loss * float("nan")
                    return loss, {"loss": loss.detach().clone(), "kd_loss": kd.detach(), "compression_loss": comp.detach(),
                                  "evicted_fraction": frac.detach().mean()}

                return out, loss_func

            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            with cuda_to_cpu_mode():
                reduced = fwd_bwd(forward_step_func=forward_step,
                                  data_iterator=_batches(train_ds, step, t_cfg.global_batch_size,
                                                         t_cfg.micro_batch_size, dp_rank, dp),
                                  model=[ddp], num_microbatches=num_micro, seq_length=t_cfg.seq_length,
                                  micro_batch_size=msg_batch, forward_only=False)
            metrics = _dp_mean(step_metrics(reduced, layer_fracs / num_micro, tp))
            if not math.isfinite(metrics["loss"]):
                raise TrainingDiverged(f"loss is {metrics['loss']} at step {step}; stopped, the last good checkpoint "
                                       f"in {ckpt_dir} is kept")
            lr = optimizer.param_groups[0]["lr"]  # the rate this step applies (the scheduler moves it after)
            if after_backward is not None:
                after_backward(step, ddp)
            with cuda_to_cpu_mode():
                ok, grad_norm, _ = optimizer.step()
            scheduler.step(1)
            dt = time.perf_counter() - t0
            metrics.update(step=step + 1, target_fraction=target, target_cr=1.0 / (1.0 - target),
                           achieved_cr_train=1.0 / max(1e-9, 1.0 - metrics["evicted_fraction"]),
                           lr=lr, grad_norm=float(grad_norm or 0.0),
                           tokens_per_s=t_cfg.global_batch_size * t_cfg.seq_length / dt)
            logger.log(metrics)
            if _fault(step + 1) == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if (step + 1) % t_cfg.save_interval == 0 or step + 1 == t_cfg.steps:
                save_checkpoint(ckpt_dir, step + 1, ddp, optimizer, scheduler,
                                extra=dict(extra, consumed_samples=(step + 1) * t_cfg.global_batch_size))
            # ---- preemption: every rank agrees (all-reduce) to stop here; the worker exits PREEMPTED_EXIT_CODE
            if step + 1 < t_cfg.steps and preempt.requested():
                if latest_iteration(ckpt_dir) != step + 1:
                    save_checkpoint(ckpt_dir, step + 1, ddp, optimizer, scheduler,
                                    extra=dict(extra, consumed_samples=(step + 1) * t_cfg.global_batch_size))
                raise Preempted(step + 1, ckpt_dir, preempt.received)
    finally:
        preempt.uninstall()
        logger.close()

    if not report:
        return {}
    if tp * pp > 1:  # evaluate the final checkpoint resharded to one rank, in a fresh process
        return report_from_checkpoint(cfg, run_dir) if _rank() == 0 else {}
    return write_report(run_dir, cfg, res, student, teacher, valid_ds, logger, DMSRuntime) if _rank() == 0 else {}


def build_datasets(cfg: RefitConfig, res: Resolved, run_dir: Path):
    """(train, valid) datasets of a run: the same samples on every rank and in the end-of-run evaluation."""
    from dms_megatron.data.indexed import build_gpt_datasets

    t = cfg.train
    return build_gpt_datasets(
        res.train_prefix, res.valid_prefix, t.seq_length, t.seed, t.steps * t.global_batch_size,
        max(1, t.eval_batches * t.micro_batch_size), res.eos_id, res.pad_id, res.model_config.vocab_size,
        cache_dir=str(Path(run_dir) / "data-cache") if not cfg.embedded else None)


def _carry_hf_metadata(init_checkpoint: Path, ckpt_dir: Path, extra: dict) -> None:
    """Keep what ``dms-convert export`` needs from an imported model: its HF config (ids, rope details) in every
    student checkpoint's extra state, and its tokenizer / generation files (``hf_assets/``) beside the checkpoints."""
    from dms_megatron.training.checkpointing import read_extra

    init_extra = read_extra(init_checkpoint)
    if "hf_config" in init_extra:
        extra["hf_config"] = init_extra["hf_config"]
    assets = Path(init_checkpoint) / "hf_assets"
    if assets.is_dir() and _rank() == 0 and not (ckpt_dir / "hf_assets").exists():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(assets, ckpt_dir / "hf_assets")


def _dp_mean(metrics: dict) -> dict:
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    t /= parallel_state.get_data_parallel_world_size()
    return dict(zip(keys, t.tolist()))


__all__ = ["run_refit", "TrainingDiverged"]

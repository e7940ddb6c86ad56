"""Student wrapping and optimisation objects: megatron DDP, megatron optimizer (Adam/AdamW), LR schedule.

Mixed precision the megatron-core way: with bf16 parameters the optimizer keeps fp32 main parameters and fp32
gradients (``OptimizerConfig(bf16=True)`` -> Float16OptimizerWithFloat16Params, DDP reduces grads in fp32);
``train.distributed_optimizer`` shards that optimizer state over the data-parallel ranks.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from dms_megatron.megatron.compat import cuda_to_cpu_mode


def wrap_ddp(model, distributed_optimizer: bool = False):
    """megatron-core DistributedDataParallel around ``model`` (fp32 grad buffers, no overlap; works on gloo/CPU).

    Also installs the grad-finalisation and no-sync hooks the forward-backward schedules call.
    """
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                    use_distributed_optimizer=distributed_optimizer), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def finalize_grads(ddp) -> None:
    """What megatron's forward-backward schedules do after the last backward (a loop without them calls this)."""
    finalize_model_grads([ddp])


def build_optimizer(ddp, t_cfg, params_dtype: torch.dtype = torch.float32):
    """megatron's optimizer over the trainable parameters of ``ddp`` (Adam with decoupled weight decay = AdamW;
    gradient clipping at ``t_cfg.clip_grad``; fp32 main params and grads when ``params_dtype`` is bf16)."""
    bf16 = params_dtype == torch.bfloat16
    opt_cfg = OptimizerConfig(optimizer="adam", lr=t_cfg.lr, min_lr=t_cfg.min_lr, weight_decay=t_cfg.weight_decay,
                              adam_beta1=t_cfg.adam_beta1, adam_beta2=t_cfg.adam_beta2, clip_grad=t_cfg.clip_grad,
                              bf16=bf16, params_dtype=params_dtype, main_params_dtype=torch.float32,
                              main_grads_dtype=torch.float32,
                              use_distributed_optimizer=t_cfg.distributed_optimizer)
    with cuda_to_cpu_mode():
        return get_megatron_optimizer(opt_cfg, [ddp])


def build_scheduler(optimizer, t_cfg):
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then ``lr_decay_style`` decay to ``min_lr`` at
    ``steps``. Stepped once per optimizer step. On resume the checkpoint gives the step count only; the schedule
    is the run config's (resume refuses other changes, and a ``train.steps`` allowed to grow re-plans the decay over
    the new length instead of staying at ``min_lr``)."""
    decay_steps = max(1, t_cfg.steps - t_cfg.warmup_steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t_cfg.lr, min_lr=t_cfg.min_lr, lr_warmup_steps=t_cfg.warmup_steps,
        lr_decay_steps=t_cfg.warmup_steps + decay_steps, lr_decay_style=t_cfg.lr_decay_style,
        start_wd=t_cfg.weight_decay, end_wd=t_cfg.weight_decay, wd_incr_steps=t_cfg.steps,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)


__all__ = ["wrap_ddp", "build_optimizer", "build_scheduler", "finalize_grads"]

"""Step metrics gathered over pipeline / tensor / data-parallel ranks (equal on every rank)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

LOSS_KEYS = ("loss", "kd_loss", "compression_loss", "evicted_fraction")


def step_metrics(reduced: list, layer_fracs: torch.Tensor, tp: int) -> dict:
    """One optimizer step's metrics on every rank of a model-parallel group.

    reduced: the loss function's per-micro-batch dicts (only the last pipeline stage has them);
    layer_fracs: float64 [num_layers], this rank's micro-batch mean evicted fraction per layer (its KV heads, its
    stage's layers; zeros elsewhere). Returns the losses (mean over micro batches) and evicted_fraction/layer{k}
    (mean over all KV heads), equal on all tp x pp ranks.
    """
    v = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
    if reduced:
        for i, k in enumerate(LOSS_KEYS):
            v[i] = sum(float(r[k]) for r in reduced) / len(reduced)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(v, group=parallel_state.get_pipeline_model_parallel_group())
    fr = layer_fracs.clone()
    if parallel_state.get_model_parallel_group() is not None and dist.is_initialized() and (
            tp * parallel_state.get_pipeline_model_parallel_world_size() > 1):
        dist.all_reduce(fr, group=parallel_state.get_model_parallel_group())
    fr /= tp
    out = dict(zip(LOSS_KEYS, v.tolist()))
    out.update({f"evicted_fraction/layer{i + 1}": float(x) for i, x in enumerate(fr)})
    return out


def dp_mean(metrics: dict) -> dict:
    """Mean of every metric over the data-parallel ranks."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    t /= parallel_state.get_data_parallel_world_size()
    return dict(zip(keys, t.tolist()))


__all__ = ["step_metrics", "dp_mean", "LOSS_KEYS"]

"""Step metrics gathered over pipeline / tensor / data-parallel ranks (equal on every rank)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from dms_megatron.core.compression import achieved_cr

LOSS_KEYS = ("loss", "kd_loss", "compression_loss")
# key-slot counts of core.compression (summed over micro batches and ranks, then pooled by ``with_achieved_cr``)
COUNT_KEYS = ("evicted_slots", "slots")


def _pp_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the pipeline stages (only the last one holds the loss function's values)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(v, group=parallel_state.get_pipeline_model_parallel_group())
    return v


def step_metrics(reduced: list, layer_fracs: torch.Tensor, tp: int) -> dict:
    """One optimizer step's metrics on every rank of a model-parallel group.

    reduced: the loss function's per-micro-batch dicts (only the last pipeline stage has them);
    layer_fracs: float64 [num_layers], this rank's micro-batch mean evicted fraction per layer (its KV heads, its
    stage's layers; zeros elsewhere). Returns the losses (mean over micro batches), the key-slot counts (summed) and
    evicted_fraction/layer{k} (mean over all KV heads), equal on all tp x pp ranks.
    """
    keys = LOSS_KEYS + COUNT_KEYS
    v = torch.zeros(len(keys), dtype=torch.float64)
    for i, k in enumerate(keys):
        if reduced:
            v[i] = sum(float(r[k]) for r in reduced) / (len(reduced) if k in LOSS_KEYS else 1)
    _pp_sum(v)
    fr = layer_fracs.clone()
    if parallel_state.get_model_parallel_group() is not None and dist.is_initialized() and (
            tp * parallel_state.get_pipeline_model_parallel_world_size() > 1):
        dist.all_reduce(fr, group=parallel_state.get_model_parallel_group())
    fr /= tp
    out = dict(zip(keys, v.tolist()))
    out.update({f"evicted_fraction/layer{i + 1}": float(x) for i, x in enumerate(fr)})
    return out


def dp_mean(metrics: dict) -> dict:
    """Mean of every metric over the data-parallel ranks; the key-slot counts are summed."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    n = parallel_state.get_data_parallel_world_size()
    return {k: x if k in COUNT_KEYS else x / n for k, x in zip(keys, t.tolist())}


def with_achieved_cr(metrics: dict, cr_key: str = "achieved_cr") -> dict:
    """Replace the key-slot counts by the pooled ``evicted_fraction`` and ``cr_key`` (core.compression)."""
    evicted, slots = metrics.pop("evicted_slots"), metrics.pop("slots")
    metrics["evicted_fraction"] = evicted / slots if slots else 0.0
    metrics[cr_key] = achieved_cr(slots - evicted, slots)
    return metrics


def summed(reduced: list, keys: Sequence[str]) -> dict:
    """Each of ``keys`` summed over this rank's micro batches, the pipeline stages and the data-parallel ranks."""
    v = torch.tensor([sum(float(r[k]) for r in reduced) for k in keys] if reduced else [0.0] * len(keys),
                     dtype=torch.float64)
    _pp_sum(v)
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(v, group=parallel_state.get_data_parallel_group())
    return dict(zip(keys, v.tolist()))


__all__ = ["step_metrics", "dp_mean", "with_achieved_cr", "summed", "LOSS_KEYS", "COUNT_KEYS"]

"""The optimizer's part of a checkpoint: how megatron's optimizer lays its state out (the ``metadata`` its
``sharded_state_dict`` takes), recorded in the checkpoint and read back for the load, as Megatron-LM does.

A plain optimizer's state is per parameter, keyed like the parameter, and needs no metadata. megatron-core 0.16's
distributed optimizer defaults to a layout (``fully_sharded_model_space``) that its own checkpoint writer refuses
("ShardedTensor.flattened_range is not supported"), so a save names one (``train.dist_optim_sharding``):
``fully_reshardable`` (per parameter, loads at any layout) or ``dp_reshardable`` (the data-parallel shards as they
are, loads only at the tp x pp it was saved at). The choice travels in the checkpoint's content metadata and the load
follows it, whatever the loading run would save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron.core import parallel_state
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from dms_megatron.checkpoint.errors import CheckpointError

SHARDING_KEY = "distrib_optim_sharding_type"  # megatron-core's metadata key (Megatron-LM's content metadata)
LAYOUT_KEY = "tp_pp"  # the common state's record of the layout that saved it


def is_distributed(optimizer) -> bool:
    """Whether ``optimizer`` (or one of a chained optimizer's parts) is megatron's distributed optimizer."""
    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def layout() -> list:
    """[tp, pp] of this process's model-parallel groups ([1, 1] without them)."""
    if not parallel_state.model_parallel_is_initialized():
        return [1, 1]
    return [parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size()]


def save_metadata(optimizer, sharding: str) -> Optional[dict]:
    """The ``metadata`` of ``optimizer.sharded_state_dict`` for a save (also the checkpoint's content metadata):
    the distributed optimizer's ``sharding``, None for a plain optimizer (its state has one layout)."""
    return {SHARDING_KEY: sharding} if is_distributed(optimizer) else None


def load_metadata(d: Path, content: Optional[dict], saved_layout, distributed: bool) -> Optional[dict]:
    """The ``metadata`` of ``optimizer.sharded_state_dict`` for loading checkpoint ``d``, whose content metadata is
    ``content`` (None: saved by a plain optimizer) and which ``saved_layout`` ([tp, pp], None if unrecorded) wrote;
    one-line CheckpointError when its optimizer state cannot load into this run's optimizer (``distributed`` or
    not) at this layout."""
    sharding = (content or {}).get(SHARDING_KEY)
    if (sharding is not None) != distributed:
        saved, run = ("with", "without") if sharding is not None else ("without", "with")
        raise CheckpointError(
            f"{d} holds the optimizer state of a run {saved} the distributed optimizer, this run is {run} it: load it "
            f"with train.distributed_optimizer={str(sharding is not None).lower()}")
    if sharding in DistributedOptimizer.checkpoint_fully_reshardable_formats or sharding is None:
        return None if sharding is None else dict(content)
    if saved_layout is not None and list(saved_layout) != layout():
        (tp, pp), (run_tp, run_pp) = saved_layout, layout()
        raise CheckpointError(
            f"{d} holds the distributed optimizer's state as {sharding!r}, which loads only at the tp x pp it was "
            f"saved at (tp {tp} x pp {pp}; this run: tp {run_tp} x pp {run_pp}, any dp): resume at tp {tp} x pp {pp}, "
            f"or save with train.dist_optim_sharding=fully_reshardable to change the layout")
    return dict(content)


def has_moments(tensor_keys) -> bool:
    """Whether a checkpoint whose tensors are ``tensor_keys`` holds Adam moments (none before the first optimizer
    step): per-parameter keys ``optimizer.state.exp_avg.<param>``, or a distributed optimizer's dp_reshardable
    bucket keys ``optimizer.distributed.<group>.<bucket>.exp_avg``."""
    return any(k.startswith("optimizer.") and "exp_avg" in k.split(".") for k in tensor_keys)


__all__ = ["is_distributed", "layout", "save_metadata", "load_metadata", "has_moments",
           "SHARDING_KEY", "LAYOUT_KEY"]

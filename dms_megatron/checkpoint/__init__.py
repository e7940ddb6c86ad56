"""Megatron dist-checkpoints shared by training, conversion and inference: atomic saves, strict resharding loads,
the configs recorded with each checkpoint."""

from dms_megatron.checkpoint.store import (TRACKER, AsyncSaves, CheckpointError, checkpoints_dir, iter_dir,
                                           latest_iteration, load_checkpoint, load_model_weights,
                                           read_checkpoint_configs, read_common, read_extra, resolve_checkpoint,
                                           save_checkpoint)

__all__ = ["AsyncSaves", "save_checkpoint", "load_checkpoint", "load_model_weights", "latest_iteration",
           "resolve_checkpoint", "read_common", "read_extra", "read_checkpoint_configs", "CheckpointError", "iter_dir",
           "TRACKER", "checkpoints_dir"]

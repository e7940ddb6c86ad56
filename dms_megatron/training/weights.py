"""Initial weights of teacher and student: from a megatron dist-checkpoint (this project's or Megatron-LM's, any saved
layout) or streamed from a Hugging Face model dir into this rank's shard (``convert.hf_model``), strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dms_megatron.checkpoint.megatron_lm import load_weights
from dms_megatron.config import ConfigError, ModelConfig
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.hf_model import is_hf_dir, load_hf_into_model, read_hf_model


def load_init_weights(init: Path, model, model_cfg: ModelConfig, allow_missing: Sequence[str] = ()) -> None:
    """Fill ``model`` (this rank's stage and tensor shard) from ``init``; parameters whose name contains one of
    ``allow_missing`` may be absent from it (e.g. a DMS adapter student from a plain teacher)."""
    if not is_hf_dir(init):
        load_weights(init, model, allow_missing=allow_missing)
        return
    try:
        fam, _, _, _, reader, _ = read_hf_model(init)
        load_hf_into_model(model, reader, fam, model_cfg, None, allow_missing=allow_missing)
    except ConversionError as e:
        raise ConfigError(f"cannot load the teacher {init}: {e}") from None


def check_teacher(model, vocab_size: int) -> None:
    """One-line ConfigError for NaN/inf or constant (empty) loaded weights. The emptiness check reads the rows of
    real tokens in this rank's vocabulary shard (padding rows are zero; a tensor-parallel rank may hold only them)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConfigError(f"teacher weight {name} has NaN/inf values after loading")
    for name, m in model.named_modules():
        if name.endswith("word_embeddings"):
            real = m.weight[:max(0, vocab_size - m.vocab_start_index)].detach().float()
            if real.numel() > 1 and float(real.std()) == 0.0:
                raise ConfigError(f"teacher weight {name}.weight is constant after loading: the checkpoint looks "
                                  f"empty")


__all__ = ["load_init_weights", "check_teacher"]

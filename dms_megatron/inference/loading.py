"""Load a ``DecoderModel`` from a Hugging Face directory (plain or official DMS format), a megatron checkpoint dir
or a dms-refit run dir (converted to HF names in memory by the family's conversion rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from dms_megatron.checkpoint import CheckpointError, checkpoints_dir
from dms_megatron.checkpoint.megatron_lm import checkpoint_configs, load_weights
from dms_megatron.config import ConfigError, DMSConfig, ModelConfig
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.hf_model import is_hf_dir, read_hf_model, uses_te_names
from dms_megatron.convert.mapping import IGNORED_HF_SUFFIXES, ExportProducer, uses_adapter
from dms_megatron.families import family_by_name
from dms_megatron.families.rules import bind_rules
from dms_megatron.inference.model import DecoderModel, ModelLoadError
from dms_megatron.megatron.distributed import destroy_process_groups, init_process_groups
from dms_megatron.megatron.model import build_gpt_model, transformer_config

def load_hf(directory, *, require_dms: bool = False, dtype: torch.dtype = torch.float32) -> DecoderModel:
    """A model from ``config.json`` + safetensors. The DMS settings come from the official dms_* keys
    (dms_window_size, dms_alpha_scale, dms_initial_alpha_offset, dms_separate_alpha, dms_alpha_per, ...); a
    directory without them is a plain model, and ``require_dms`` turns that into an error."""
    directory = Path(directory)
    try:
        _, mc, dms, _, reader, _ = read_hf_model(directory)
    except ConversionError as e:
        raise ModelLoadError(str(e)) from None
    if require_dms and dms is None:
        raise ModelLoadError(f"{directory / 'config.json'} has no dms_window_size: not a DMS checkpoint; convert a "
                             f"re-fitted student with 'dms-convert export --format dms' or run it with press vanilla")
    sd = {n: reader.get(n) for n in reader.names() if not n.endswith(IGNORED_HF_SUFFIXES)}
    return DecoderModel(mc, sd, dms, dtype=dtype, source=str(directory))


def megatron_to_hf_state_dict(sd: Dict[str, torch.Tensor], mc: ModelConfig,
                              dms: Optional[DMSConfig]) -> Dict[str, torch.Tensor]:
    """A full (tp=1, pp=1) megatron GPTModel state dict -> HF names (vocab padding removed)."""
    bound = bind_rules(family_by_name(mc.family).rules, mc, adapter=uses_adapter(dms), te=uses_te_names(sd))
    missing = [b.megatron for b in bound if b.megatron not in sd]
    if missing:
        hint = " (not a DMS adapter checkpoint)" if "dms_alpha" in missing[0] else ""
        raise ModelLoadError(f"megatron tensor {missing[0]!r} is missing ({len(missing)} missing){hint}")
    produce = ExportProducer(bound, lambda name: sd[name].detach(), mc)
    return {n: produce(n) for b in bound for n in b.hf}


def from_megatron(sd: Dict[str, torch.Tensor], mc: ModelConfig, dms: Optional[DMSConfig],
                  dtype: torch.dtype = torch.float32) -> DecoderModel:
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    return DecoderModel(mc, megatron_to_hf_state_dict(sd, mc, dms), dms, dtype=dtype, source="megatron state dict")


def load_megatron(path, *, iteration: Optional[int] = None, require_dms: bool = False,
                  dtype: torch.dtype = torch.float32) -> DecoderModel:
    """A model from a megatron checkpoint written by dms-convert import or dms-refit, or a dms-refit run dir (loaded
    at tp=1, pp=1 in this process, then renamed to HF names in memory)."""
    path = checkpoints_dir(path)
    try:
        mc, dms, _ = checkpoint_configs(path, iteration)
    except (CheckpointError, ConfigError) as e:
        raise ModelLoadError(str(e)) from None
    if require_dms and dms is None:
        raise ModelLoadError(f"{path}: the checkpoint records no dms_config: not a DMS checkpoint (a plain model); "
                             f"run it with press vanilla or re-fit it with dms-refit first")
    owned = not torch.distributed.is_initialized()
    if owned:
        init_process_groups(1, 1)
    try:
        model = build_gpt_model(mc, dms, seq_length=mc.max_position_embeddings,
                                config=transformer_config(mc, perform_initialization=False))
        try:
            load_weights(path, model, iteration)
        except CheckpointError as e:
            raise ModelLoadError(str(e)) from None
        sd = dict(model.state_dict())
    finally:
        if owned:
            destroy_process_groups()
    return from_megatron(sd, mc, dms, dtype=dtype)


def load_model(path, *, iteration: Optional[int] = None, require_dms: bool = False,
               dtype: torch.dtype = torch.float32) -> DecoderModel:
    """Any model source: a HF directory (config.json), a megatron checkpoint dir or a dms-refit run dir."""
    if is_hf_dir(path):
        return load_hf(path, require_dms=require_dms, dtype=dtype)
    return load_megatron(path, iteration=iteration, require_dms=require_dms, dtype=dtype)


__all__ = ["load_hf", "load_megatron", "load_model", "megatron_to_hf_state_dict", "from_megatron", "checkpoints_dir"]

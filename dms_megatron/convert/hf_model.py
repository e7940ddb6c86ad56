"""A Hugging Face model directory as the converter and the trainer see it: validated against its family's rules
without loading tensors (``read_hf_model``), and streamed into a megatron model of any tp / pp rank
(``load_hf_into_model``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from dms_megatron.config import ConfigError, DMSConfig, ModelConfig
from dms_megatron.convert.hf_io import ConversionError, SafetensorsReader, read_config
from dms_megatron.convert.mapping import dms_from_hf, pp_layer_range, tp_shard, uses_adapter, validate_hf_tensors
from dms_megatron.convert.progress import ByteProgress
from dms_megatron.families import family_by_name
from dms_megatron.families.rules import TP_ROWS, BoundRule, VocabPad, bind_rules

DEFAULT_DIVISIBLE_BY = 128


def is_hf_dir(path) -> bool:
    """A directory with a config.json (a HF model), as opposed to a megatron checkpoint dir."""
    return (Path(path) / "config.json").is_file()


def read_hf_model(hf_dir, *, tp: int = 1, divisible_by: int = DEFAULT_DIVISIBLE_BY):
    """Validate a HF checkpoint directory without loading tensors.

    Returns (family, ModelConfig, DMSConfig or None, config.json dict, reader, bound rules). At tensor-parallel size
    ``tp`` the padded vocab is a multiple of ``divisible_by * tp`` (``ModelConfig.padded_vocab_size``).
    """
    hf = read_config(hf_dir)
    try:
        mc = ModelConfig.from_hf(hf, divisible_by, f"{Path(hf_dir) / 'config.json'}")
        dms = dms_from_hf(hf)
    except ConfigError as e:
        raise ConversionError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    fam = family_by_name(mc.family)
    reader = SafetensorsReader(hf_dir)
    bound = bind_rules(fam.rules, mc, adapter=uses_adapter(dms))
    available = {n: (i.shape, i.dtype) for n, i in reader.infos.items()}
    head, embed = fam.names.weight("head"), fam.names.weight("embed")
    if mc.tie_embeddings and head in available:
        # Some tied checkpoints also store the head; accept it only if it really is the embedding.
        if not torch.equal(reader.get(head), reader.get(embed)):
            raise ConversionError(f"{hf_dir}: tie_word_embeddings=true but {head} differs from {embed}; set "
                                  f"tie_word_embeddings=false in config.json")
        del available[head]
    validate_hf_tensors(bound, available, str(hf_dir))
    return fam, mc, dms, hf, reader, bound


def _local_name(b: BoundRule, cfg: ModelConfig, pp: int, pp_rank: int) -> Optional[str]:
    """Name of bound rule ``b`` in the model of pipeline stage ``pp_rank`` (None if the stage does not hold it)."""
    if b.layer is not None:
        layers = pp_layer_range(cfg, pp, pp_rank)
        if b.layer not in layers:
            return None
        return b.megatron.replace(f"layers.{b.layer}.", f"layers.{b.layer - layers.start}.", 1)
    if b.megatron.startswith("embedding."):
        return b.megatron if pp_rank == 0 else None
    return b.megatron if pp_rank == pp - 1 else None


def uses_te_names(model_or_state_dict) -> bool:
    """Whether megatron parameter names are the Transformer Engine spec's (norms fused into the next linear)."""
    sd = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in sd)


class _RankTarget:
    """This rank's parameters of ``model`` and the tensor-parallel shard rule that fills them."""

    def __init__(self, model, mc: ModelConfig):
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.pp, self.pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        self.mc = mc
        self.params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
        self.written: set = set()

    def targets(self, b: BoundRule) -> List[str]:
        """The local parameter names rule ``b`` fills on this rank (a tied head: the last stage keeps its own copy
        of the tied embedding as the output layer)."""
        name = _local_name(b, self.mc, self.pp, self.pp_rank)
        tied_head = (self.mc.tie_embeddings and self.pp > 1 and self.pp_rank == self.pp - 1
                     and b.megatron.startswith("embedding.word"))
        return ([name] if name is not None else []) + (["output_layer.weight"] if tied_head else [])

    def put(self, name: str, full: torch.Tensor, kind: str) -> None:
        if name not in self.params:
            raise ConversionError(f"megatron model has no parameter {name!r} (model built with another config?)")
        shard = tp_shard(full, kind, self.tp, self.tp_rank)
        dst = self.params[name]
        if tuple(dst.shape) != tuple(shard.shape):
            raise ConversionError(f"{name}: converted shard {list(shard.shape)} does not match the megatron "
                                  f"parameter {list(dst.shape)} (tp={self.tp})")
        with torch.no_grad():
            dst.copy_(shard)
        self.written.add(name)

    def put_vocab(self, name: str, w: torch.Tensor) -> None:
        """Pad a vocabulary tensor straight into this rank's rows: no padded copy of the (largest) tensor."""
        p = self.params.get(name)
        padded = self.mc.padded_vocab_size(self.tp)
        if p is None or p.shape[0] * self.tp != padded:
            raise ConversionError(f"megatron parameter {name!r} missing or not [{padded}/{self.tp}, "
                                  f"hidden] (model built with another config?)")
        with torch.no_grad():
            VocabPad.fill_shard(w, p, self.tp, self.tp_rank)
        self.written.add(name)


def load_hf_into_model(model, reader: SafetensorsReader, fam, mc: ModelConfig, dms: Optional[DMSConfig],
                       allow_missing: Sequence[str] = ()) -> int:
    """Stream the HF tensors this rank holds into ``model`` (one rule at a time). Every parameter of ``model`` must
    be written exactly once, except those whose name contains one of ``allow_missing`` (e.g. "dms_alpha": a DMS
    adapter student initialised from a plain model keeps its initial adapter); returns the number written."""
    bound = bind_rules(fam.rules, mc, adapter=uses_adapter(dms), te=uses_te_names(model))
    target = _RankTarget(model, mc)
    progress = ByteProgress(f"loading {reader.directory}", sum(reader.infos[n].end - reader.infos[n].begin
                                                               for b in bound for n in b.hf))
    for b in bound:
        targets = target.targets(b)
        if targets and isinstance(b.rule.transform, VocabPad) and b.rule.tp == TP_ROWS:
            (w,) = [reader.get(n) for n in b.hf]
            for t in targets:
                target.put_vocab(t, w)
        elif targets:
            full = b.rule.transform.to_megatron([reader.get(n) for n in b.hf], mc)
            for t in targets:
                target.put(t, full, b.rule.tp)
            del full
        progress.add(sum(reader.infos[n].end - reader.infos[n].begin for n in b.hf))
    missing = sorted(k for k in set(target.params) - target.written if not any(a in k for a in allow_missing))
    if missing:
        raise ConversionError(f"megatron parameter {missing[0]!r} has no source tensor ({len(missing)} such): "
                              f"mapping incomplete for this model")
    return len(target.written)


__all__ = ["read_hf_model", "load_hf_into_model", "is_hf_dir", "uses_te_names", "DEFAULT_DIVISIBLE_BY"]

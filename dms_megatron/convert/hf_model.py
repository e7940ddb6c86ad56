"""A Hugging Face model directory as the converter and the trainer see it: validated against its family's rules
without loading tensors (``read_hf_model``), and streamed into a megatron model of any tp / pp rank
(``load_hf_into_model``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from dms_megatron.config import ConfigError, DMSConfig, ModelConfig
from dms_megatron.convert.families import family_for_hf_config, uses_adapter
from dms_megatron.convert.hf_io import ConversionError, SafetensorsReader, read_config
from dms_megatron.convert.mapping import (TP_ROWS, BoundRule, VocabPad, bind_rules, dms_from_hf, pp_layer_range,
                                          tp_shard, validate_hf_tensors)

DEFAULT_DIVISIBLE_BY = 128


def is_hf_dir(path) -> bool:
    """A directory with a config.json (a HF model), as opposed to a megatron checkpoint dir."""
    return (Path(path) / "config.json").is_file()


def read_hf_model(hf_dir, *, tp: int = 1, divisible_by: int = DEFAULT_DIVISIBLE_BY):
    """Validate a HF checkpoint directory without loading tensors.

    Returns (family, ModelConfig, DMSConfig or None, config.json dict, reader, bound rules). The padded vocab is a
    multiple of ``divisible_by`` and of ``tp``.
    """
    hf = read_config(hf_dir)
    fam = family_for_hf_config(hf, f"{Path(hf_dir) / 'config.json'}")
    try:
        mc = fam.from_hf(hf, divisible_by)
        if mc.padded_vocab_size % tp:
            mc = fam.from_hf(hf, divisible_by * tp)
        dms = dms_from_hf(hf)
    except ConfigError as e:
        raise ConversionError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    reader = SafetensorsReader(hf_dir)
    bound = bind_rules(fam.rules, mc, adapter=uses_adapter(dms))
    available = {n: (i.shape, i.dtype) for n, i in reader.infos.items()}
    if mc.tie_embeddings and "lm_head.weight" in available:
        # Some tied checkpoints also store the head; accept it only if it really is the embedding.
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ConversionError(f"{hf_dir}: tie_word_embeddings=true but lm_head.weight differs from "
                                  f"model.embed_tokens.weight; set tie_word_embeddings=false in config.json")
        del available["lm_head.weight"]
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


def uses_te_names(model) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in model.state_dict())


def load_hf_into_model(model, reader: SafetensorsReader, fam, mc: ModelConfig, dms: Optional[DMSConfig],
                       allow_missing: Sequence[str] = ()) -> int:
    """Stream the HF tensors this rank holds into ``model`` (one rule at a time). Every parameter of ``model`` must
    be written exactly once, except those whose name contains one of ``allow_missing`` (e.g. "dms_alpha": a DMS
    adapter student initialised from a plain model keeps its initial adapter); returns the number written."""
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    bound = bind_rules(fam.rules, mc, adapter=uses_adapter(dms), te=uses_te_names(model))
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    written = set()

    def put(name: str, full: torch.Tensor, kind: str) -> None:
        if name not in params:
            raise ConversionError(f"megatron model has no parameter {name!r} (model built with another config?)")
        shard = tp_shard(full, kind, tp, tp_rank)
        dst = params[name]
        if tuple(dst.shape) != tuple(shard.shape):
            raise ConversionError(f"{name}: converted shard {list(shard.shape)} does not match the megatron "
                                  f"parameter {list(dst.shape)} (tp={tp})")
        with torch.no_grad():
            dst.copy_(shard)
        written.add(name)

    for b in bound:
        name = _local_name(b, mc, pp, pp_rank)
        tied_head = mc.tie_embeddings and pp > 1 and pp_rank == pp - 1 and b.megatron.startswith("embedding.word")
        if name is None and not tied_head:
            continue
        targets = ([name] if name is not None else []) + (["output_layer.weight"] if tied_head else [])
        # (a tied head: the last stage keeps its own copy of the tied embedding as the output layer)
        if isinstance(b.rule.transform, VocabPad) and b.rule.tp == TP_ROWS:
            (w,) = [reader.get(n) for n in b.hf]  # pad in place: no padded copy of the (largest) vocab tensor
            for t in targets:
                if t not in params or params[t].shape[0] * tp != mc.padded_vocab_size:
                    raise ConversionError(f"megatron parameter {t!r} missing or not [{mc.padded_vocab_size}/{tp}, "
                                          f"hidden] (model built with another config?)")
                with torch.no_grad():
                    VocabPad.fill_shard(w, params[t], tp, tp_rank)
                written.add(t)
            del w
            continue
        full = b.rule.transform.to_megatron([reader.get(n) for n in b.hf], mc)
        for t in targets:
            put(t, full, b.rule.tp)
        del full
    missing = sorted(k for k in set(params) - written if not any(a in k for a in allow_missing))
    if missing:
        raise ConversionError(f"megatron parameter {missing[0]!r} has no source tensor ({len(missing)} such): "
                              f"mapping incomplete for this model")
    return len(written)


__all__ = ["read_hf_model", "load_hf_into_model", "is_hf_dir", "uses_te_names", "DEFAULT_DIVISIBLE_BY"]

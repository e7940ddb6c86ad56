"""The generic engine over a family's weight rules (``dms_megatron.families.rules``): it validates a HF checkpoint
against the rules bound to a concrete model (missing / extra / wrongly shaped tensors fail before anything is
converted), streams tensors to HF on export, and splits megatron tensors for tensor and pipeline parallel ranks;
plus the DMS keys of the official DMS HF config.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dms_megatron.config import DMSConfig, ModelConfig
from dms_megatron.convert.hf_io import ConversionError, PlannedTensor
from dms_megatron.families import family_by_name
from dms_megatron.families.rules import TP_COLS, TP_GATED, TP_REPLICATED, TP_ROWS, BoundRule, bind_rules

# names some HF checkpoints carry that hold no weights (recomputed buffers)
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def validate_hf_tensors(bound: Sequence[BoundRule], available: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
                        source: str) -> None:
    """Every expected HF tensor present with its expected shape, and nothing else (one-line ConversionError; a DMS
    adapter tensor too many or too few says so)."""
    expected = {}
    for b in bound:
        for name, shape in zip(b.hf, b.hf_shapes):
            expected[name] = shape
    missing = [n for n in expected if n not in available]
    if missing:
        hint = ("the checkpoint has no DMS adapter: load it with its own DMS settings or as a plain model"
                if "dms_proj_alpha" in missing[0] else "the checkpoint does not match its config.json")
        raise ConversionError(f"tensor {missing[0]!r} is missing from {source} ({len(missing)} missing): {hint}")
    extra = [n for n in available if n not in expected and not n.endswith(IGNORED_HF_SUFFIXES)]
    if extra:
        hint = ("a DMS adapter checkpoint: pass its DMS config" if "dms_proj_alpha" in extra[0] else
                "unsupported architecture variant or wrong config.json")
        raise ConversionError(f"unexpected tensor {extra[0]!r} in {source} ({len(extra)} unexpected): {hint}")
    for name, shape in expected.items():
        if tuple(available[name][0]) != shape:
            raise ConversionError(f"tensor {name!r} in {source} has shape {list(available[name][0])}, "
                                  f"expected {list(shape)} from config.json")


def export_plan(bound: Sequence[BoundRule], dtype_of: Callable[[BoundRule], torch.dtype]) -> List[PlannedTensor]:
    return [PlannedTensor(n, s, dtype_of(b)) for b in bound for n, s in zip(b.hf, b.hf_shapes)]


class ExportProducer:
    """``produce(hf_name)`` for the streaming writer: computes a rule's HF tensors from its megatron tensor when its
    first HF name is requested and hands them out one by one (at most one rule's outputs are held)."""

    def __init__(self, bound: Sequence[BoundRule], get_megatron: Callable[[str], torch.Tensor], cfg: ModelConfig,
                 dtype: Optional[torch.dtype] = None) -> None:
        self.by_hf = {n: b for b in bound for n in b.hf}
        self.get_megatron, self.cfg, self.dtype = get_megatron, cfg, dtype
        self.pending: Dict[str, torch.Tensor] = {}

    def __call__(self, hf_name: str) -> torch.Tensor:
        if hf_name not in self.pending:
            b = self.by_hf[hf_name]
            outs = b.rule.transform.to_hf(self.get_megatron(b.megatron), self.cfg)
            self.pending = {n: (o if self.dtype is None else o.to(self.dtype)) for n, o in zip(b.hf, outs)}
        return self.pending.pop(hf_name)


# ---------------------------------------------------------------------------------------------------------------
# tensor / pipeline parallel shards (pure tensor work)
# ---------------------------------------------------------------------------------------------------------------
def pp_layer_range(cfg: ModelConfig, pp: int, pp_rank: int) -> range:
    """Global layers held by pipeline stage ``pp_rank`` (megatron's even split)."""
    if cfg.num_layers % pp:
        raise ConversionError(f"model.num_layers={cfg.num_layers} is not divisible by --pp {pp}")
    n = cfg.num_layers // pp
    return range(pp_rank * n, (pp_rank + 1) * n)


def tp_shard(t: torch.Tensor, kind: str, tp: int, rank: int) -> torch.Tensor:
    """The slice of full megatron tensor ``t`` held by tensor-parallel rank ``rank``."""
    if tp == 1 or kind == TP_REPLICATED:
        return t
    if kind == TP_ROWS:
        return torch.chunk(t, tp, dim=0)[rank]
    if kind == TP_COLS:
        return torch.chunk(t, tp, dim=1)[rank]
    if kind == TP_GATED:
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, dim=0)[rank], torch.chunk(up, tp, dim=0)[rank]])
    raise ValueError(f"unknown tensor-parallel split {kind!r}")


def uses_adapter(dms: Optional[DMSConfig]) -> bool:
    return dms is not None and dms.alpha_source == "adapter"


def hf_tensor_shapes(cfg: ModelConfig, dms: Optional[DMSConfig]) -> Dict[str, tuple]:
    """HF tensor name -> shape of a model (with the DMS adapter tensors when dms.alpha_source == "adapter"), in
    checkpoint order: what the family's rules expect a HF directory to hold."""
    bound = bind_rules(family_by_name(cfg.family).rules, cfg, adapter=uses_adapter(dms))
    return {n: s for b in bound for n, s in zip(b.hf, b.hf_shapes)}


# ---------------------------------------------------------------------------------------------------------------
# the DMS keys of the official DMS HF config
# ---------------------------------------------------------------------------------------------------------------
# The official config asserts dms_window_size > dms_paged_attention_block_size (default 256).
DMS_DEFAULT_BLOCK = 256


def dms_to_hf(dms) -> dict:
    """DMSConfig -> the dms_* keys of the official HF config (dms_cr documents the final compression ratio)."""
    block = DMS_DEFAULT_BLOCK
    while block >= dms.window and block > 1:
        block //= 2
    cr = int(dms.final_cr) if float(dms.final_cr).is_integer() else float(dms.final_cr)
    return {
        "dms_alpha_scale": float(dms.alpha_scale), "dms_initial_alpha_offset": float(dms.alpha_offset),
        "dms_window_size": int(dms.window), "dms_paged_attention_block_size": block, "dms_cr": cr,
        "dms_disable_eviction": False, "dms_separate_alpha": dms.alpha_source == "adapter",
        "dms_alpha_per": dms.alpha_per, "dms_tau": float(dms.tau),
    }


def dms_from_hf(hf: dict):
    """The DMSConfig recorded in a DMS-format config.json, or None for a plain model."""
    if "dms_window_size" not in hf:
        return None
    cr = float(hf.get("dms_cr", 1.0))
    d = DMSConfig()  # a key the file omits takes DMSConfig's default
    return DMSConfig(window=int(hf["dms_window_size"]),
                     alpha_source="adapter" if hf.get("dms_separate_alpha", False) else "qneuron",
                     alpha_per=hf.get("dms_alpha_per", d.alpha_per),
                     alpha_scale=float(hf.get("dms_alpha_scale", d.alpha_scale)),
                     alpha_offset=float(hf.get("dms_initial_alpha_offset", d.alpha_offset)),
                     tau=float(hf.get("dms_tau", d.tau)), initial_cr=1.0, final_cr=max(cr, 1.0))


__all__ = ["validate_hf_tensors", "export_plan", "ExportProducer", "tp_shard", "pp_layer_range", "uses_adapter",
           "hf_tensor_shapes", "dms_to_hf", "dms_from_hf", "IGNORED_HF_SUFFIXES", "TP_REPLICATED", "TP_ROWS",
           "TP_COLS", "TP_GATED"]

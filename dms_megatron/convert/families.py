"""The model-family registry: one ``FamilySpec`` per name in ``config.FAMILIES``, each from the family's own file
(``dms_megatron.convert.<name>``), keyed once by that list."""

from __future__ import annotations

from importlib import import_module
from typing import Dict, Optional

import torch

from dms_megatron.config import FAMILIES, DMSConfig, ModelConfig
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.mapping import FamilySpec, bind_rules

#: dtype names of the converter's --dtype flags and of HF config.json's torch_dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAMILY_SPECS: Dict[str, FamilySpec] = {name: import_module(f"{__package__}.{name}").FAMILY for name in FAMILIES}


def family_by_name(name: str) -> FamilySpec:
    if name not in FAMILY_SPECS:
        raise ConversionError(f"model family {name!r} has no conversion mapping; supported: "
                              f"{', '.join(FAMILY_SPECS)}")
    return FAMILY_SPECS[name]


def family_for_hf_config(hf: dict, source: str = "config.json") -> FamilySpec:
    """The family of a HF config: by ``architectures`` (or ``model_type`` when absent, e.g. DMS exports)."""
    fams = list(FAMILY_SPECS.values())
    archs = hf.get("architectures") or []
    for f in fams:
        if f.architecture in archs:
            return f
    if not archs:
        for f in fams:
            if hf.get("model_type") == f.model_type:
                return f
    got = archs or hf.get("model_type")
    raise ConversionError(f"{source}: unknown architecture {got!r}; supported: "
                          f"{', '.join(f.architecture for f in fams)}")


def hf_tensor_shapes(cfg: ModelConfig, dms: Optional[DMSConfig]) -> Dict[str, tuple]:
    """HF tensor name -> shape of a model (with the DMS adapter tensors when dms.alpha_source == "adapter"), in
    checkpoint order: what the family's rules expect a HF directory to hold."""
    bound = bind_rules(family_by_name(cfg.family).rules, cfg, adapter=uses_adapter(dms))
    return {n: s for b in bound for n, s in zip(b.hf, b.hf_shapes)}


def uses_adapter(dms: Optional[DMSConfig]) -> bool:
    return dms is not None and dms.alpha_source == "adapter"


__all__ = ["FAMILY_SPECS", "family_by_name", "family_for_hf_config", "hf_tensor_shapes", "uses_adapter", "DTYPES"]

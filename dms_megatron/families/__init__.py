"""Model families: one file per architecture (``families/<name>.py`` declares its ``FAMILY``, a ``Family``) and
the registry below, one line per family. Config validation, conversion, the megatron layer spec, the inference
decoder, export and the tests all read ``FAMILIES``.

block.py holds the block and tensor-name descriptions, rules.py the HF <-> megatron weight rules built from them,
family.py the ``Family`` value and the config.json reading and writing the families share.
"""

from __future__ import annotations

from importlib import import_module
from typing import Dict

from dms_megatron.families.block import ConversionError
from dms_megatron.families.family import Family

#: The registered families, by name, in lookup order (a Megatron-LM checkpoint takes the first whose block fits).
NAMES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
)
FAMILIES: Dict[str, Family] = {name: import_module(f"{__package__}.{name}").FAMILY for name in NAMES}


def family_by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise ConversionError(f"model family {name!r} has no conversion mapping; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for_hf_config(hf: dict, source: str = "config.json") -> Family:
    """The family of a HF config: by ``architectures`` (or ``model_type`` when absent, e.g. DMS exports)."""
    fams = list(FAMILIES.values())
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


def family_for_block(qkv_bias: bool, qk_norm: bool) -> Family:
    """The registered family whose block fits a model with these q/k/v biases and q/k norms best (q/k norms weigh
    first; the first registered on a tie): how a Megatron-LM checkpoint, which names no family, gets one."""
    return max(FAMILIES.values(), key=lambda f: (f.block.qk_norm == qk_norm, f.block.qkv_bias == qkv_bias))


__all__ = ["FAMILIES", "NAMES", "Family", "ConversionError", "family_by_name", "family_for_hf_config",
           "family_for_block"]

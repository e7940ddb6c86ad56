"""Hugging Face <-> megatron-core checkpoint conversion (``dms-convert import`` / ``dms-convert export``).

mapping.py holds the transform vocabulary and engine, llama.py / qwen2.py / qwen3.py the per-family rules and
config translation, hf_io.py streaming safetensors I/O, cli.py the workflows and the command line.
"""

from __future__ import annotations

from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.mapping import FamilySpec


def _families():
    from dms_megatron.convert import llama, qwen2, qwen3

    return {f.name: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}


def family_by_name(name: str) -> FamilySpec:
    fams = _families()
    if name not in fams:
        raise ConversionError(f"model family {name!r} has no conversion mapping; supported: {', '.join(fams)}")
    return fams[name]


def family_for_hf_config(hf: dict, source: str = "config.json") -> FamilySpec:
    """The family of a HF config: by ``architectures`` (or ``model_type`` when absent, e.g. DMS exports)."""
    fams = list(_families().values())
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


__all__ = ["ConversionError", "FamilySpec", "family_by_name", "family_for_hf_config"]

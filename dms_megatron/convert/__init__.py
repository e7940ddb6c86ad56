"""Hugging Face <-> megatron-core checkpoint conversion.

mapping.py holds the transform vocabulary and engine; llama.py / qwen2.py / qwen3.py (one file per name in
``config.FAMILIES``) the per-family rules and config translation; families.py the registry; hf_io.py streaming
safetensors I/O; hf_model.py reading and validating a HF model dir and streaming it into a megatron model;
workflows.py the import / export workflows (the ``dms-convert`` command is ``dms_megatron.launch.convert``).
"""

from dms_megatron.convert.families import FAMILY_SPECS, family_by_name, family_for_hf_config
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.mapping import FamilySpec

__all__ = ["ConversionError", "FamilySpec", "FAMILY_SPECS", "family_by_name", "family_for_hf_config"]

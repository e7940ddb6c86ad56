"""Hugging Face <-> megatron-core checkpoint conversion over the model families of ``dms_megatron.families``.

mapping.py holds the engine over a family's weight rules (checkpoint validation, export streaming, tp / pp shards);
hf_io.py streaming safetensors I/O; hf_model.py reading and validating a HF model dir and streaming it into a
megatron model; workflows.py the import / export workflows (the ``dms-convert`` command is
``dms_megatron.launch.convert``).
"""

from dms_megatron.convert.hf_io import ConversionError

__all__ = ["ConversionError"]

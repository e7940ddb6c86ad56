"""Qwen2 family (Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen): Llama layout plus q/k/v bias (o_proj has none)."""

from __future__ import annotations

from dms_megatron.config import ModelConfig
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.llama import BASE_RULES
from dms_megatron.convert.mapping import FamilySpec, common_from_hf, common_to_hf

# Same names as Llama; the "qkv_bias" rule is active because from_hf sets add_qkv_bias=True.
RULES = BASE_RULES


def from_hf(hf: dict, divisible_by: int) -> ModelConfig:
    if hf.get("use_sliding_window", False):
        raise ConversionError("qwen2 config.json: use_sliding_window=true is not supported (full attention only)")
    if hf.get("rope_scaling") and (hf["rope_scaling"].get("rope_type") or hf["rope_scaling"].get("type")) == "llama3":
        raise ConversionError("qwen2 config.json: rope_scaling llama3 is not a Qwen2 setting")
    return common_from_hf(hf, "qwen2", divisible_by, add_qkv_bias=True)


def to_hf(cfg: ModelConfig) -> dict:
    return {**common_to_hf(cfg, "Qwen2ForCausalLM", "qwen2"), "use_sliding_window": False, "sliding_window": None}


FAMILY = FamilySpec(name="qwen2", model_type="qwen2", architecture="Qwen2ForCausalLM", rules=RULES,
                    from_hf=from_hf, to_hf=to_hf)

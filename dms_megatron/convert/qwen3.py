"""Qwen3 family: Llama layout plus per-head RMSNorm on queries and keys (q_norm / k_norm), no biases."""

from __future__ import annotations

from dms_megatron.config import ModelConfig
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.llama import BASE_RULES
from dms_megatron.convert.mapping import FamilySpec, common_from_hf, common_to_hf

# Same names as Llama; the "qk_norm" rules are active because from_hf sets qk_layernorm=True.
RULES = BASE_RULES


def from_hf(hf: dict, divisible_by: int) -> ModelConfig:
    if hf.get("attention_bias", False):
        raise ConversionError("qwen3 config.json: attention_bias=true (bias on q/k/v/o) is not supported")
    if hf.get("use_sliding_window", False):
        raise ConversionError("qwen3 config.json: use_sliding_window=true is not supported (full attention only)")
    return common_from_hf(hf, "qwen3", divisible_by, qk_layernorm=True)


def to_hf(cfg: ModelConfig) -> dict:
    return {**common_to_hf(cfg, "Qwen3ForCausalLM", "qwen3"), "attention_bias": False,
            "use_sliding_window": False, "sliding_window": None}


FAMILY = FamilySpec(name="qwen3", model_type="qwen3", architecture="Qwen3ForCausalLM", rules=RULES,
                    from_hf=from_hf, to_hf=to_hf)

"""Llama 3.x family: HF ``LlamaForCausalLM`` <-> megatron-core GPTModel (local spec names)."""

from __future__ import annotations

from dms_megatron.config import ModelConfig
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.mapping import (DMS_ADAPTER_RULES, TP_COLS, TP_GATED, TP_ROWS, FamilySpec, FusedQKV,
                                          GatedMLP, Rule, VocabPad, common_from_hf, common_to_hf)

L = "decoder.layers.{i}."
H = "model.layers.{i}."

# megatron name, HF name(s), HF shape(s), transform, tensor-parallel split, condition, transformer-engine name
BASE_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (("vocab", "hidden"),),
         VocabPad(), tp=TP_ROWS),
    Rule(L + "input_layernorm.weight", (H + "input_layernorm.weight",), (("hidden",),),
         te_name=L + "self_attention.linear_qkv.layer_norm_weight"),
    Rule(L + "self_attention.linear_qkv.weight",
         (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"),
         (("q_out", "hidden"), ("kv_out", "hidden"), ("kv_out", "hidden")), FusedQKV(), tp=TP_ROWS),
    Rule(L + "self_attention.linear_qkv.bias",
         (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"),
         (("q_out",), ("kv_out",), ("kv_out",)), FusedQKV(), tp=TP_ROWS, when="qkv_bias"),
    Rule(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), (("head_dim",),),
         when="qk_norm"),
    Rule(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), (("head_dim",),),
         when="qk_norm"),
    Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), (("hidden", "q_out"),),
         tp=TP_COLS),
    *DMS_ADAPTER_RULES,
    Rule(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",), (("hidden",),),
         te_name=L + "mlp.linear_fc1.layer_norm_weight"),
    Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
         (("ffn", "hidden"), ("ffn", "hidden")), GatedMLP(), tp=TP_GATED),
    Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), (("hidden", "ffn"),), tp=TP_COLS),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), (("hidden",),)),
    Rule("output_layer.weight", ("lm_head.weight",), (("vocab", "hidden"),), VocabPad(), tp=TP_ROWS, when="untied"),
)
RULES = BASE_RULES


def from_hf(hf: dict, divisible_by: int) -> ModelConfig:
    if hf.get("attention_bias", False):
        raise ConversionError("llama config.json: attention_bias=true (bias on q/k/v/o) is not supported")
    return common_from_hf(hf, "llama", divisible_by)


def to_hf(cfg: ModelConfig) -> dict:
    return {**common_to_hf(cfg, "LlamaForCausalLM", "llama"), "attention_bias": False, "mlp_bias": False}


FAMILY = FamilySpec(name="llama", model_type="llama", architecture="LlamaForCausalLM", rules=RULES,
                    from_hf=from_hf, to_hf=to_hf)

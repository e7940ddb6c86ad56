"""Build megatron-core GPT models (stock teacher or DMS student) from ``ModelConfig`` / ``DMSConfig``."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from dms_megatron.config import DMSConfig, ModelConfig
from dms_megatron.config.run import resolved_precision
from dms_megatron.families import family_by_name
from dms_megatron.families.block import ACTIVATIONS
from dms_megatron.megatron.compat import apply_cpu_compat
from dms_megatron.megatron.spec import get_gpt_layer_dms_spec, get_gpt_layer_stock_spec


def params_dtype(precision: str) -> torch.dtype:
    """The parameter dtype of ``train.precision`` on this machine (``config.resolved_precision``)."""
    return torch.bfloat16 if resolved_precision(precision, torch.cuda.is_available()) == "bf16" else torch.float32


def transformer_config(model_cfg: ModelConfig, *, tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
                       precision: str = "fp32", **overrides) -> TransformerConfig:
    """Megatron TransformerConfig for the decoder of ``model_cfg``'s family (its block's norm and gated-MLP
    activation; RoPE, GQA, no linear bias but the q/k/v bias ``add_qkv_bias``). ``precision`` "bf16": bf16
    parameters, activations and pipeline messages (the optimizer keeps fp32 copies)."""
    on_gpu = torch.cuda.is_available()
    block = family_by_name(model_cfg.family).block
    dtype = params_dtype(precision)
    kw = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels,
        layernorm_epsilon=model_cfg.norm_epsilon,
        normalization=block.norm,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[block.activation],
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        init_method_std=model_cfg.init_method_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not on_gpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Fusions need transformer-engine / apex kernels; keep them off (and always off on CPU).
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt_model(model_cfg: ModelConfig, dms_cfg: Optional[DMSConfig] = None, *, seq_length: int,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    config: Optional[TransformerConfig] = None, vp_stage: Optional[int] = None,
                    fused_attention: Optional[bool] = None):
    """A megatron-core GPTModel for this rank. ``dms_cfg=None`` -> stock model, else the DMS student, in the layer
    spec ``model_cfg.spec`` (``spec.py``; ``fused_attention`` overrides where the stock local spec uses SDPA).

    pre_process / post_process default to this rank's pipeline position. The DMS config (or None) is attached as
    ``model.dms_config`` and the architecture as ``model.model_config``.
    """
    apply_cpu_compat()
    if config is None:
        config = transformer_config(
            model_cfg, tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if dms_cfg is None:
        spec = get_gpt_layer_stock_spec(model_cfg, fused_attention)
    else:
        spec = get_gpt_layer_dms_spec(dms_cfg, model_cfg)
    rope_kwargs = {}
    if model_cfg.rope_scaling == "llama3":
        rope_kwargs = dict(rope_scaling=True, rope_scaling_factor=model_cfg.rope_scaling_factor)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model_cfg.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=max(seq_length, model_cfg.max_position_embeddings),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rotary_base),
        vp_stage=vp_stage,
        **rope_kwargs,
    )
    if config.bf16:  # every parameter in bf16, norms included (what megatron's Float16Module does)
        model.bfloat16()
    model.dms_config = dms_cfg
    model.model_config = model_cfg
    return model


__all__ = ["transformer_config", "build_gpt_model", "params_dtype"]

"""GPT layer specs: megatron-core's local or Transformer Engine spec (``model.spec``) of the model family's block
(its norm; q/k norms per ``model.qk_layernorm``), for the stock teacher / plain model and with DMS attention swapped
in for the student.

local: megatron's own modules; on CUDA its core attention is ``SDPACoreAttention`` (fused torch SDPA: no L x L
scores), on CPU megatron's ``DotProductAttention``. te: megatron's Transformer Engine spec (fused norms + linears,
TE's fused attention); needs transformer-engine, one-line error naming the fix otherwise. DMS students always use
DMS's own core attention (the kernel of ``dms.backend``).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                      get_gpt_layer_with_transformer_engine_spec)
from megatron.core.transformer.spec_utils import ModuleSpec

from dms_megatron.config import ConfigError, DMSConfig, ModelConfig
from dms_megatron.families import family_by_name
from dms_megatron.megatron.attention import DMSCoreAttention, DMSSelfAttention, DMSTransformerLayer
from dms_megatron.megatron.core_attention import SDPACoreAttention

TE_FIX = "model.spec=te needs transformer-engine: pip install -e '.[gpu]' on a CUDA machine (or model.spec=local)"


def _te_spec(qk_layernorm: bool) -> ModuleSpec:
    try:
        import transformer_engine  # noqa: F401  (optional: only the te spec needs it; absent on CPU machines)
    except ImportError:
        raise ConfigError(TE_FIX) from None
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def get_gpt_layer_stock_spec(model_cfg: ModelConfig, fused_attention: Optional[bool] = None) -> ModuleSpec:
    """The teacher / plain layer of ``model_cfg.spec``. ``fused_attention`` (default: on CUDA) puts
    ``SDPACoreAttention`` into the local spec."""
    if model_cfg.spec == "te":
        return _te_spec(model_cfg.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=model_cfg.qk_layernorm,
                                    normalization=family_by_name(model_cfg.family).block.norm)
    if torch.cuda.is_available() if fused_attention is None else fused_attention:
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def get_gpt_layer_dms_spec(dms_cfg: DMSConfig, model_cfg: ModelConfig) -> ModuleSpec:
    """The stock layer of ``model_cfg.spec`` with DMS self-attention, core attention and transformer layer."""
    spec = copy.deepcopy(get_gpt_layer_stock_spec(model_cfg, fused_attention=False))
    spec.module = DMSTransformerLayer
    attn = spec.submodules.self_attention
    attn.module = DMSSelfAttention
    attn.params = dict(attn.params or {}, dms_config=dms_cfg)
    attn.submodules.core_attention = ModuleSpec(module=DMSCoreAttention, params={"dms_config": dms_cfg})
    return spec


__all__ = ["get_gpt_layer_stock_spec", "get_gpt_layer_dms_spec", "TE_FIX"]

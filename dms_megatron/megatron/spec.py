"""GPT layer specs with DMS attention swapped into megatron-core's stock specs."""

from __future__ import annotations

import copy

from megatron.core.transformer.spec_utils import ModuleSpec

from dms_megatron.config import DMSConfig
from dms_megatron.megatron.attention import DMSCoreAttention, DMSSelfAttention, DMSTransformerLayer


def _swap_in_dms(spec: ModuleSpec, dms_cfg: DMSConfig) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    spec.module = DMSTransformerLayer
    attn = spec.submodules.self_attention
    attn.module = DMSSelfAttention
    attn.params = dict(attn.params or {}, dms_config=dms_cfg)
    attn.submodules.core_attention = ModuleSpec(module=DMSCoreAttention, params={"dms_config": dms_cfg})
    return spec


def get_gpt_layer_local_stock_spec(*, qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core's local (no transformer-engine) GPT layer with RMSNorm: the teacher / baseline layer."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")


def get_gpt_layer_dms_spec(dms_cfg: DMSConfig, *, qk_layernorm: bool = False, use_te: bool = False) -> ModuleSpec:
    """GPT decoder layer spec with DMS self-attention, core attention and transformer layer.

    use_te=False: megatron-core local modules (CPU and GPU). use_te=True: transformer-engine linear/norm modules
    (GPU; needs the ``[gpu]`` extra); the core attention is always DMS's own (dense or flex backend).
    """
    if use_te:
        try:
            import transformer_engine  # noqa: F401
        except ImportError as e:  # pragma: no cover - GPU-only path
            raise ImportError(
                "use_te=True needs transformer-engine: pip install -e '.[gpu]' on a CUDA machine"
            ) from e
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        base = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        base = get_gpt_layer_local_stock_spec(qk_layernorm=qk_layernorm)
    return _swap_in_dms(base, dms_cfg)


__all__ = ["get_gpt_layer_dms_spec", "get_gpt_layer_local_stock_spec"]

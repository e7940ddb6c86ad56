"""A stock core attention for megatron-core's local layer spec that never materialises the L x L scores: causal
attention through torch's fused ``scaled_dot_product_attention`` (flash / memory-efficient / cuDNN kernels on CUDA).

megatron's own ``DotProductAttention`` (the local spec's default) builds the full [b, np, sq, sk] score tensor; the
teacher and plain models of the local spec use this module on CUDA instead (``spec.get_gpt_layer_stock_spec``). On
CUDA the math fallback, which would materialise the scores, is excluded: inputs no fused kernel accepts raise.
Same constructor and forward contract as ``DotProductAttention``:
query [sq, b, np, hn], key / value [sk, b, ng, hn] -> [sq, b, np * hn].
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPACoreAttention does not support context parallelism (cp > 1)")
        if config.apply_query_key_layer_scaling:
            raise NotImplementedError("apply_query_key_layer_scaling is not supported by SDPACoreAttention")
        self.layer_number = max(1, layer_number)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports plain causal attention only (no packed sequences "
                                      "or attention_bias)")
        sq, b, np_, hn = query.shape
        if key.shape[0] != sq:
            raise NotImplementedError(f"SDPACoreAttention computes full-sequence causal attention (sq == sk); got "
                                      f"sq={sq}, sk={key.shape[0]}")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        gqa = k.shape[1] != np_
        if q.is_cuda:
            with sdpa_kernel(FUSED):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                     enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


__all__ = ["SDPACoreAttention", "FUSED"]

"""Megatron-core modules for DMS: a self-attention that produces eviction decisions and a core attention that
applies delayed eviction.

Data flow in one layer (s sequence, b batch, np/ng local query/KV heads, hn head dim), every hand-off through the
forward's ``DMSRuntime`` (``runtime.py``: the one side channel, bound to the three modules by ``dms_forward``):
  DMSTransformerLayer.forward holds its input (the pre-norm residual stream, [s, b, h]) for the layer's call
     (``DMSRuntime.holding_input``; the adapter variant reads it with ``layer_input``);
  DMSSelfAttention.get_query_key_value_tensors -> query [s, b, np, hn] (pre-RoPE) -> decision logits [s, b, ng]
     (q-neuron: borrowed neuron * scale - offset, then the neuron is zeroed; adapter: Linear(RMSNorm(h_pre)))
     -> ``DMSRuntime.send_decisions``;
  megatron applies RoPE and calls the core attention;
  DMSCoreAttention.forward -> ``DMSRuntime.take_decisions``, zeroes the neuron again (post-RoPE), turns the logits
     into per-key eviction scores, calls the kernel from ``dms_megatron.core.attention`` and returns what it saw
     with ``DMSRuntime.record``.
What the layer does (train / hard / teacher) comes only from that runtime.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer

from dms_megatron.config import DMSConfig
from dms_megatron.core.attention import load_kernel, resolve_backend_name
from dms_megatron.core.gating import (
    global_ids,
    gumbel_sigmoid,
    hard_decisions,
    logistic_noise,
    projection_decision_logits,
    qneuron_decision_logits,
    zero_borrowed_neuron,
)
from dms_megatron.core.compression import evicted_key_fraction
from dms_megatron.core.masks import decisions_to_key_logits
from dms_megatron.core.norms import rms_norm
from dms_megatron.megatron.collectives import all_reduce_sum
from dms_megatron.megatron.distributed import KV_HEADS, check_divides
from dms_megatron.megatron.runtime import RuntimeBound


class DMSAlphaNorm(torch.nn.Module):
    """RMSNorm of the adapter (``core.norms.rms_norm``: Hugging Face's Llama/Qwen math)."""

    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # Replicated over tp; with sequence parallel its grads are partial sums megatron must all-reduce.
        setattr(self.weight, "sequence_parallel", sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _zero_init(weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.zeros_(weight)


class DMSTransformerLayer(RuntimeBound, TransformerLayer):
    """TransformerLayer that holds its input (the pre-attention-norm residual stream) in the forward's runtime for
    the duration of its call, for the adapter of its self-attention."""

    def forward(self, *args, **kwargs):
        if not getattr(self.self_attention, "reads_layer_input", False):  # q-neuron decisions need no hidden states
            return super().forward(*args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with self.runtime().holding_input(self.layer_number, hidden):
            return super().forward(*args, **kwargs)


class DMSSelfAttention(RuntimeBound, SelfAttention):
    """SelfAttention that computes DMS decision logits from the borrowed query neuron or an adapter."""

    def __init__(self, config, submodules, layer_number: int, *args, dms_config: DMSConfig, **kwargs):
        if config.num_query_groups is not None:  # DMS decides per KV head: each tp rank holds whole ones
            check_divides(config.num_query_groups, KV_HEADS, parallel_state.get_tensor_model_parallel_world_size(),
                          "parallel.tp")
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.dms_config = dms_config
        self.num_groups_local = self.num_query_groups_per_partition
        # the adapter reads the layer's pre-norm input, held by DMSTransformerLayer in the runtime
        self.reads_layer_input = dms_config.alpha_source == "adapter"
        if self.reads_layer_input:
            self.dms_alpha_norm = DMSAlphaNorm(config.hidden_size, config.layernorm_epsilon,
                                               sequence_parallel=config.sequence_parallel)
            self.dms_alpha_proj = ColumnParallelLinear(
                config.hidden_size, config.num_query_groups, config=config, init_method=_zero_init, bias=False,
                gather_output=False, skip_bias_add=True, is_expert=False,
            )
        if not isinstance(self.core_attention, DMSCoreAttention):
            raise TypeError("DMSSelfAttention needs DMSCoreAttention as its core_attention submodule "
                            "(build the layer with get_gpt_layer_dms_spec)")

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        rt = self.runtime()
        if rt.mode == "teacher":
            rt.send_decisions(self.layer_number, None)
            return out
        if not isinstance(out, tuple) or len(out) < 3 or isinstance(out[1], list):
            raise RuntimeError("DMS needs split query/key/value tensors (disable fused_single_qkv_rope)")
        query = out[0]
        cfg = self.dms_config
        if cfg.alpha_source == "qneuron":
            logits = qneuron_decision_logits(query, self.num_groups_local, cfg.alpha_scale, cfg.alpha_offset)
            query = zero_borrowed_neuron(query, self.num_groups_local)
        else:
            proj, _ = self.dms_alpha_proj(self.dms_alpha_norm(rt.layer_input(self.layer_number)))  # [s, b, ng_l]
            logits = projection_decision_logits(proj, cfg.alpha_scale, cfg.alpha_offset)
        rt.send_decisions(self.layer_number, logits)  # [s, b, ng_local]
        return (query,) + tuple(out[1:])


class DMSCoreAttention(RuntimeBound, MegatronModule):
    """Core attention with DMS delayed eviction. Same constructor/forward contract as megatron's
    DotProductAttention: forward(query [sq, b, np, hn], key/value [sk, b, ng, hn], ...) -> [sq, b, np * hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, *, dms_config: DMSConfig, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("DMS core attention does not support context parallelism (cp > 1)")
        self.layer_number = max(1, layer_number)
        self.dms_config = dms_config
        hn = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hn)
        if config.apply_query_key_layer_scaling:
            raise NotImplementedError("apply_query_key_layer_scaling is not supported by DMS attention")
        # "auto" is resolved here, once, for the device this model is built for (CUDA when there is one)
        self.kernel_device = "cuda" if torch.cuda.is_available() else "cpu"
        self.kernel_name = resolve_backend_name(dms_config.backend, self.kernel_device)
        self.kernel = load_kernel(self.kernel_name)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            raise NotImplementedError("DMS attention does not support packed sequences (THD format)")
        if attention_bias is not None:
            raise NotImplementedError("DMS attention does not take an external attention_bias")
        logits = self.runtime().take_decisions(self.layer_number)
        if self.dms_config.backend == "auto" and query.device.type != self.kernel_device:
            raise RuntimeError(f"DMS core attention was built for {self.kernel_device} (dms.backend=auto -> "
                               f"{self.kernel_name}) but runs on {query.device.type}: build the model on the device "
                               f"it runs on, or set dms.backend explicitly")
        kernel = self.kernel
        sq, b, np_, hn = query.shape
        ng = key.shape[2]
        cfg = self.dms_config
        if logits is not None and cfg.alpha_source == "qneuron":
            query = zero_borrowed_neuron(query, ng)  # RoPE mixed the zeroed dim with its partner: zero again
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        if logits is None:  # teacher mode: the original model
            out = kernel(q, k, v, key_logits=None, window=cfg.window, softmax_scale=self.softmax_scale)
        else:
            out = self._dms_attention(kernel, q, k, v, logits.permute(1, 2, 0))  # logits -> [b, ng, s]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _head0(self, x: torch.Tensor) -> torch.Tensor:
        """alpha_per=layer: global KV head 0's row of x [b, ng_local, s] for every local head. Head 0 lives on
        tensor-parallel rank 0; the other ranks receive it by a sum over the group (rank 0's value, zeros elsewhere),
        whose backward returns every rank's gradient to rank 0."""
        head0 = x[:, :1]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            rank = parallel_state.get_tensor_model_parallel_rank()
            # `head0 * 0` (not zeros_like) keeps every rank's autograd graph, so all ranks run the backward all-reduce
            head0 = all_reduce_sum(head0 if rank == 0 else head0 * 0.0,
                                   parallel_state.get_tensor_model_parallel_group())
        return head0.expand_as(x)

    def _dms_attention(self, kernel, q, k, v, logits):
        cfg, rt, layer = self.dms_config, self.runtime(), self.layer_number
        b, ng, s = logits.shape
        if rt.mode == "train":
            sample_ids = rt.sample_ids if rt.sample_ids is not None else torch.arange(b)
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            noise = logistic_noise(rt.seed, rt.step, layer, sample_ids, global_ids(tp_rank * ng, ng),
                                   torch.arange(s, device=logits.device), dtype=logits.dtype)
            _, hard, noisy = gumbel_sigmoid(logits, noise, cfg.tau)  # each [b, ng, s]
            if cfg.alpha_per == "layer":
                hard, noisy = self._head0(hard), self._head0(noisy)
            key_scores = decisions_to_key_logits(noisy)  # key k <- position k+1; last key: -inf (keep)
            out = kernel(q, k, v, key_logits=key_scores, window=cfg.window, softmax_scale=self.softmax_scale,
                         hard=False)
            decisions = hard
        else:
            if cfg.alpha_per == "layer":
                logits = self._head0(logits)
            key_scores = decisions_to_key_logits(logits)
            out = kernel(q, k, v, key_logits=key_scores, window=cfg.window, softmax_scale=self.softmax_scale,
                         hard=True)
            decisions = hard_decisions(logits).to(logits.dtype)
        rt.record(layer, evicted_key_fraction(decisions, rt.valid), decisions, logits)  # core.compression's rule
        return out


__all__ = ["DMSSelfAttention", "DMSCoreAttention", "DMSTransformerLayer", "DMSAlphaNorm"]

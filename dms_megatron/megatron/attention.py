"""Megatron-core modules for DMS: a self-attention that produces eviction decisions and a core attention that
applies delayed eviction.

Data flow in one layer (s sequence, b batch, np/ng local query/KV heads, hn head dim):
  DMSTransformerLayer holds its input (the pre-norm residual stream, [s, b, h]) in the self-attention's
     ``AdapterInput`` for the attention call (the adapter variant reads it from there);
  DMSSelfAttention.get_query_key_value_tensors -> query [s, b, np, hn] (pre-RoPE) -> decision logits [s, b, ng]
     (q-neuron: borrowed neuron * scale - offset, then the neuron is zeroed; adapter: Linear(RMSNorm(h_pre)))
     -> ``DecisionChannel.send``;
  megatron applies RoPE and calls the core attention;
  DMSCoreAttention.forward -> ``DecisionChannel.receive``, zeroes the neuron again (post-RoPE), turns the logits into
     per-key eviction scores and calls the kernel from ``dms_megatron.core.attention``.
What the layer does (train / hard / teacher) comes only from the ``DMSRuntime`` of the forward
(``runtime.dms_forward``).
"""

from __future__ import annotations

import contextlib
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
from dms_megatron.megatron.runtime import DMSRuntime


class DecisionChannel:
    """The hand-off of one forward's decision logits [s, b, ng_local] from the self-attention (which computes them
    before RoPE) to its core attention (which applies them). Exactly one ``send`` per ``receive``; anything else is a
    wiring error and raises."""

    def __init__(self) -> None:
        self._logits: Optional[torch.Tensor] = None
        self._sent = False

    def send(self, logits: Optional[torch.Tensor]) -> None:
        if self._sent:
            raise RuntimeError("DMS decision logits sent twice without being consumed by the core attention")
        self._logits, self._sent = logits, True

    def receive(self) -> Optional[torch.Tensor]:
        if not self._sent:
            raise RuntimeError("DMS core attention ran without decision logits from its self-attention (build the "
                               "layer with get_gpt_layer_dms_spec)")
        logits, self._logits, self._sent = self._logits, None, False
        return logits


class AdapterInput:
    """The hand-off of a layer's pre-attention-norm input [s, b, h] from ``DMSTransformerLayer`` to the adapter of its
    ``DMSSelfAttention``: held for exactly one attention call (``holding``), read inside it (``get``); a read outside
    one is a wiring error and raises."""

    def __init__(self) -> None:
        self._hidden: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def holding(self, hidden: torch.Tensor):
        if self._hidden is not None:
            raise RuntimeError("DMS adapter input held twice: attention calls of one layer may not nest")
        self._hidden = hidden
        try:
            yield
        finally:
            self._hidden = None

    def get(self) -> torch.Tensor:
        if self._hidden is None:
            raise RuntimeError("DMS adapter needs the pre-norm hidden states: build the layer with "
                               "get_gpt_layer_dms_spec (DMSTransformerLayer)")
        return self._hidden


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


class DMSTransformerLayer(TransformerLayer):
    """TransformerLayer that holds its input (the pre-attention-norm residual stream) in its DMS self-attention's
    ``adapter_input`` for the duration of the attention call."""

    def _forward_attention(self, hidden_states, *args, **kwargs):
        handoff = self.self_attention.adapter_input
        if handoff is None:  # q-neuron decisions need no hidden states
            return super()._forward_attention(hidden_states, *args, **kwargs)
        with handoff.holding(hidden_states):
            return super()._forward_attention(hidden_states, *args, **kwargs)


class DMSSelfAttention(SelfAttention):
    """SelfAttention that computes DMS decision logits from the borrowed query neuron or an adapter."""

    is_dms_attention = True

    def __init__(self, config, submodules, layer_number: int, *args, dms_config: DMSConfig, **kwargs):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if config.num_query_groups is not None and config.num_query_groups < tp:
            raise ValueError(
                f"DMS needs num_query_groups (KV heads) >= tensor parallel size: {config.num_query_groups} KV heads "
                f"with tp={tp}; lower parallel.tp to at most {config.num_query_groups}"
            )
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.dms_config = dms_config
        self.dms_runtime: Optional[DMSRuntime] = None  # bound by runtime.dms_forward for one forward
        self.num_groups_local = self.num_query_groups_per_partition
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        # the adapter's input, handed over by DMSTransformerLayer; None for q-neuron decisions
        self.adapter_input = AdapterInput() if dms_config.alpha_source == "adapter" else None
        if self.adapter_input is not None:
            self.dms_alpha_norm = DMSAlphaNorm(config.hidden_size, config.layernorm_epsilon,
                                               sequence_parallel=config.sequence_parallel)
            self.dms_alpha_proj = ColumnParallelLinear(
                config.hidden_size, config.num_query_groups, config=config, init_method=_zero_init, bias=False,
                gather_output=False, skip_bias_add=True, is_expert=False,
            )
        if not isinstance(self.core_attention, DMSCoreAttention):
            raise TypeError("DMSSelfAttention needs DMSCoreAttention as its core_attention submodule "
                            "(build the layer with get_gpt_layer_dms_spec)")
        self.core_attention.bind(self)

    def runtime(self) -> DMSRuntime:
        if self.dms_runtime is None:
            raise RuntimeError(f"DMS layer {self.layer_number} ran outside a DMS forward: run the model under "
                               f"`with dms_forward(model, DMSRuntime(mode=...))` (dms_megatron.megatron.runtime)")
        return self.dms_runtime

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        if self.runtime().mode == "teacher":
            self.core_attention.channel.send(None)
            return out
        if not isinstance(out, tuple) or len(out) < 3 or isinstance(out[1], list):
            raise RuntimeError("DMS needs split query/key/value tensors (disable fused_single_qkv_rope)")
        query = out[0]
        cfg = self.dms_config
        if cfg.alpha_source == "qneuron":
            logits = qneuron_decision_logits(query, self.num_groups_local, cfg.alpha_scale, cfg.alpha_offset)
            query = zero_borrowed_neuron(query, self.num_groups_local)
        else:
            proj, _ = self.dms_alpha_proj(self.dms_alpha_norm(self.adapter_input.get()))  # [s, b, ng_local]
            logits = projection_decision_logits(proj, cfg.alpha_scale, cfg.alpha_offset)
        self.core_attention.channel.send(logits)  # [s, b, ng_local]
        return (query,) + tuple(out[1:])


class DMSCoreAttention(MegatronModule):
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
        self.channel = DecisionChannel()
        self._owner = None
        # "auto" is resolved here, once, for the device this model is built for (CUDA when there is one)
        self.kernel_device = "cuda" if torch.cuda.is_available() else "cpu"
        self.kernel_name = resolve_backend_name(dms_config.backend, self.kernel_device)
        self.kernel = load_kernel(self.kernel_name)

    def bind(self, owner: DMSSelfAttention) -> None:
        # A plain attribute (not a submodule): the owner holds this module, not the other way round.
        object.__setattr__(self, "_owner", owner)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            raise NotImplementedError("DMS attention does not support packed sequences (THD format)")
        if attention_bias is not None:
            raise NotImplementedError("DMS attention does not take an external attention_bias")
        logits = self.channel.receive()
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
        cfg, owner = self.dms_config, self._owner
        rt = owner.runtime()
        b, ng, s = logits.shape
        layer = owner.layer_number
        if rt.mode == "train":
            sample_ids = rt.sample_ids if rt.sample_ids is not None else torch.arange(b)
            noise = logistic_noise(rt.seed, rt.step, layer, sample_ids, global_ids(owner.tp_rank * ng, ng),
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
        rt.fractions[layer] = evicted_key_fraction(decisions, rt.valid)  # core.compression's counting rule
        if rt.record_flags:
            rt.key_flags[layer] = decisions_to_key_logits(decisions.detach() > 0.5, fill=False)
            rt.logits[layer] = logits.detach()
        return out


__all__ = ["DMSSelfAttention", "DMSCoreAttention", "DMSTransformerLayer", "DMSAlphaNorm", "DecisionChannel",
           "AdapterInput"]

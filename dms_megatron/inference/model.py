"""A compact pure-torch decoder of any registered model family that runs from a Hugging-Face-named state dict: the
family (``dms_megatron.families``) names its tensors and describes its block (norm, MLP activation, biases, q/k norms).

The model does not own a KV cache: ``forward`` calls ``attend(layer, q, k, v, decisions)`` for every layer, so the
engine (``engine.py``) decides which keys each query sees (vanilla cache, DMS delayed eviction, baselines).

Notation: b batch, s new tokens, h hidden, np query heads, ng KV heads, g = np // ng, hn head dim.
Query heads are group-major: query head j belongs to KV head j // g.

DMS decisions (``dms`` set), one logit per (token, KV head), > 0 = evict the previous token:
  qneuron: q_norm(q)[first head of each group, -1] * alpha_scale - alpha_offset, that neuron zeroed before and
           after RoPE (it carries no attention signal);
  adapter: Linear(RMSNorm(pre-norm residual)) * alpha_scale - alpha_offset with the family's tensors
           dms_alpha_norm [h] and dms_alpha_proj [ng, h] (model.layers.{i}.self_attn.dms_proj_alpha(_norm)).
  alpha_per="layer": KV head 0's logit applies to every head of the layer.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from dms_megatron.config import DMSConfig, ModelConfig
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.mapping import IGNORED_HF_SUFFIXES, uses_adapter, validate_hf_tensors
from dms_megatron.core.gating import (apply_alpha_per, projection_decision_logits, qneuron_decision_logits,
                                      zero_borrowed_neuron)
from dms_megatron.core.rope import apply_rope, rope_inv_freq
from dms_megatron.families import family_by_name
from dms_megatron.families.block import ACTIVATIONS, NORMS
from dms_megatron.families.rules import bind_rules

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class ModelLoadError(ValueError):
    """A state dict or checkpoint does not match the model configuration (the message names tensor and fix)."""


def check_state_dict(cfg: ModelConfig, dms: Optional[DMSConfig], sd: Dict[str, torch.Tensor], source: str) -> None:
    """Every tensor the family's rules expect for ``cfg`` (and ``dms``'s adapter), with its shape, and no other:
    one-line ModelLoadError naming the first offender and the fix (``convert.mapping.validate_hf_tensors``)."""
    try:
        bound = bind_rules(family_by_name(cfg.family).rules, cfg, adapter=uses_adapter(dms))
        validate_hf_tensors(bound, {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}, source)
    except ConversionError as e:
        raise ModelLoadError(str(e)) from None


class DecoderModel(torch.nn.Module):
    """A decoder of family ``cfg.family`` over its HF tensor names; ``dms`` adds eviction decisions (None: the plain
    model)."""

    def __init__(self, cfg: ModelConfig, state_dict: Dict[str, torch.Tensor], dms: Optional[DMSConfig] = None,
                 dtype: torch.dtype = torch.float32, source: str = "state dict") -> None:
        super().__init__()
        self.cfg, self.dms, self.dtype = cfg, dms, dtype
        family = family_by_name(cfg.family)
        self.names, self.norm, self.act = family.names, NORMS[family.block.norm], ACTIVATIONS[family.block.activation]
        sd = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
        if cfg.tie_embeddings:
            sd.pop(self.names.weight("head"), None)
        check_state_dict(cfg, dms, sd, source)
        self.w = {n: sd[n].detach().to(dtype).clone() for n in sd}
        self.inv_freq = rope_inv_freq(cfg.kv_channels, cfg.rotary_base,
                                      cfg.rope_scaling_factor if cfg.rope_scaling == "llama3" else None)
        self.decides = dms is not None

    # ---- pieces the engine calls -------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [b, s] -> hidden [b, s, h]."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got [{int(ids.min())}, "
                             f"{int(ids.max())}]")
        return F.embedding(ids, self.tensor("embed"))

    def attention_inputs(self, i: int, x: torch.Tensor, positions: torch.Tensor):
        """Layer i, x [b, s, h] (pre-norm residual), positions [b, s] ->
        q [b, np, s, hn], k [b, ng, s, hn] (RoPE applied), v [b, ng, s, hn], decisions [b, ng, s] or None."""
        cfg, norm, eps = self.cfg, self.norm, self.cfg.norm_epsilon
        w = functools.partial(self.tensor, i=i)
        b, s, _ = x.shape
        np_, ng, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        xn = norm(x, w("input_norm"), eps)
        q, k, v = (F.linear(xn, w(r), self.w.get(self.names.bias(r, i))) for r in ("q", "k", "v"))  # bias or None
        q = q.view(b, s, np_, hn)  # [b, s, np, hn]
        k = k.view(b, s, ng, hn)
        v = v.view(b, s, ng, hn).transpose(1, 2)  # [b, ng, s, hn]
        if cfg.qk_layernorm:
            q, k = norm(q, w("q_norm"), eps), norm(k, w("k_norm"), eps)
        decisions = None
        if self.decides:
            d = self.dms
            if d.alpha_source == "qneuron":
                decisions = qneuron_decision_logits(q, ng, d.alpha_scale, d.alpha_offset)  # [b, s, ng]
                q = zero_borrowed_neuron(q, ng)
            else:
                a = norm(x, w("dms_alpha_norm"), eps)
                decisions = projection_decision_logits(F.linear(a, w("dms_alpha_proj")), d.alpha_scale,
                                                       d.alpha_offset)
            decisions = apply_alpha_per(decisions, d.alpha_per).transpose(1, 2).contiguous()  # [b, ng, s]
        q = apply_rope(q.transpose(1, 2), positions, self.inv_freq)  # [b, np, s, hn]
        k = apply_rope(k.transpose(1, 2), positions, self.inv_freq)  # [b, ng, s, hn]
        if self.decides and self.dms.alpha_source == "qneuron":
            q = zero_borrowed_neuron(q.transpose(1, 2), ng).transpose(1, 2)  # RoPE mixed the neuron back in
        return q, k, v, decisions

    def layer_output(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [b, s, h] residual, attn [b, np, s, hn] -> next residual [b, s, h]."""
        w = functools.partial(self.tensor, i=i)
        b, np_, s, hn = attn.shape
        x = x + F.linear(attn.transpose(1, 2).reshape(b, s, np_ * hn), w("o"))
        y = self.norm(x, w("mlp_norm"), self.cfg.norm_epsilon)
        y = self.act(F.linear(y, w("gate"))) * F.linear(y, w("up"))
        return x + F.linear(y, w("down"))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, h] -> logits [b, s, vocab]."""
        x = self.norm(x, self.tensor("final_norm"), self.cfg.norm_epsilon)
        return F.linear(x, self.tensor("embed" if self.cfg.tie_embeddings else "head"))

    def tensor(self, role: str, i: Optional[int] = None) -> torch.Tensor:
        """The weight of module ``role`` (a field of ``families.block.HFNames``) of layer ``i``."""
        return self.w[self.names.weight(role, i)]

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.kv_channels)

    # ---- full-sequence forward ---------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                attend: Optional[AttendFn] = None) -> torch.Tensor:
        """ids [b, s] -> logits [b, s, vocab]. ``attend(layer, q, k, v, decisions) -> [b, np, s, hn]`` defaults to
        causal attention over the s tokens (decisions ignored)."""
        b, s = ids.shape
        if positions is None:
            positions = torch.arange(s).expand(b, s)
        attend = attend or self.causal_attend
        x = self.embed(ids).to(self.dtype)
        for i in range(self.cfg.num_layers):
            q, k, v, dec = self.attention_inputs(i, x, positions)
            x = self.layer_output(i, x, attend(i, q, k, v, dec))
        return self.head(x)

    def causal_attend(self, i, q, k, v, decisions=None):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                              is_causal=True, scale=self.softmax_scale)


__all__ = ["DecoderModel", "ModelLoadError", "check_state_dict"]

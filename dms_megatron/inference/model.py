"""A compact pure-torch decoder (Llama / Qwen2 / Qwen3) that runs from a Hugging-Face-named state dict.

The model does not own a KV cache: ``forward`` calls ``attend(layer, q, k, v, decisions)`` for every layer, so the
engine (``engine.py``) decides which keys each query sees (vanilla cache, DMS delayed eviction, baselines).

Notation: b batch, s new tokens, h hidden, np query heads, ng KV heads, g = np // ng, hn head dim.
Query heads are group-major: query head j belongs to KV head j // g.

DMS decisions (``dms`` set), one logit per (token, KV head), > 0 = evict the previous token:
  qneuron: q_norm(q)[first head of each group, -1] * alpha_scale - alpha_offset, that neuron zeroed before and
           after RoPE (it carries no attention signal);
  adapter: Linear(RMSNorm(pre-norm residual)) * alpha_scale - alpha_offset with tensors
           model.layers.{i}.self_attn.dms_proj_alpha_norm.weight [h] and .dms_proj_alpha.weight [ng, h].
  alpha_per="layer": KV head 0's logit applies to every head of the layer.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from dms_megatron.config import DMSConfig, ModelConfig
from dms_megatron.convert.families import family_by_name, uses_adapter
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.mapping import IGNORED_HF_SUFFIXES, bind_rules, validate_hf_tensors
from dms_megatron.core.gating import (apply_alpha_per, projection_decision_logits, qneuron_decision_logits,
                                      zero_borrowed_neuron)
from dms_megatron.core.norms import rms_norm
from dms_megatron.core.rope import apply_rope, rope_inv_freq

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
    """Llama/Qwen2/Qwen3 decoder over HF tensor names; ``dms`` adds eviction decisions (None: the plain model)."""

    def __init__(self, cfg: ModelConfig, state_dict: Dict[str, torch.Tensor], dms: Optional[DMSConfig] = None,
                 dtype: torch.dtype = torch.float32, source: str = "state dict") -> None:
        super().__init__()
        self.cfg, self.dms, self.dtype = cfg, dms, dtype
        sd = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
        if cfg.tie_embeddings and "lm_head.weight" in sd:
            sd.pop("lm_head.weight")
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
        return F.embedding(ids, self.w["model.embed_tokens.weight"])

    def attention_inputs(self, i: int, x: torch.Tensor, positions: torch.Tensor):
        """Layer i, x [b, s, h] (pre-norm residual), positions [b, s] ->
        q [b, np, s, hn], k [b, ng, s, hn] (RoPE applied), v [b, ng, s, hn], decisions [b, ng, s] or None."""
        cfg, w, p = self.cfg, self.w, f"model.layers.{i}."
        b, s, _ = x.shape
        np_, ng, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        xn = rms_norm(x, w[p + "input_layernorm.weight"], cfg.norm_epsilon)
        q = F.linear(xn, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
        k = F.linear(xn, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
        v = F.linear(xn, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
        q = q.view(b, s, np_, hn)  # [b, s, np, hn]
        k = k.view(b, s, ng, hn)
        v = v.view(b, s, ng, hn).transpose(1, 2)  # [b, ng, s, hn]
        if cfg.qk_layernorm:
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], cfg.norm_epsilon)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], cfg.norm_epsilon)
        decisions = None
        if self.decides:
            d = self.dms
            if d.alpha_source == "qneuron":
                decisions = qneuron_decision_logits(q, ng, d.alpha_scale, d.alpha_offset)  # [b, s, ng]
                q = zero_borrowed_neuron(q, ng)
            else:
                a = rms_norm(x, w[p + "self_attn.dms_proj_alpha_norm.weight"], cfg.norm_epsilon)
                decisions = projection_decision_logits(F.linear(a, w[p + "self_attn.dms_proj_alpha.weight"]),
                                                       d.alpha_scale, d.alpha_offset)
            decisions = apply_alpha_per(decisions, d.alpha_per).transpose(1, 2).contiguous()  # [b, ng, s]
        q = apply_rope(q.transpose(1, 2), positions, self.inv_freq)  # [b, np, s, hn]
        k = apply_rope(k.transpose(1, 2), positions, self.inv_freq)  # [b, ng, s, hn]
        if self.decides and self.dms.alpha_source == "qneuron":
            q = zero_borrowed_neuron(q.transpose(1, 2), ng).transpose(1, 2)  # RoPE mixed the neuron back in
        return q, k, v, decisions

    def layer_output(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [b, s, h] residual, attn [b, np, s, hn] -> next residual [b, s, h]."""
        cfg, w, p = self.cfg, self.w, f"model.layers.{i}."
        b, np_, s, hn = attn.shape
        x = x + F.linear(attn.transpose(1, 2).reshape(b, s, np_ * hn), w[p + "self_attn.o_proj.weight"])
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.norm_epsilon)
        y = F.silu(F.linear(y, w[p + "mlp.gate_proj.weight"])) * F.linear(y, w[p + "mlp.up_proj.weight"])
        return x + F.linear(y, w[p + "mlp.down_proj.weight"])

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, h] -> logits [b, s, vocab]."""
        x = rms_norm(x, self.w["model.norm.weight"], self.cfg.norm_epsilon)
        out = self.w["model.embed_tokens.weight"] if self.cfg.tie_embeddings else self.w["lm_head.weight"]
        return F.linear(x, out)

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

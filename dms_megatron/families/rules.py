"""Declarative HF <-> megatron-core weight rules: a small typed transform vocabulary, the rules of a Llama-shaped
decoder built from a family's HF tensor names, and their binding to a concrete model.

A ``Rule`` pairs a megatron name with one or more HF names (``{i}`` = layer index), the HF shapes (symbolic, resolved
from the ModelConfig), the transform between them, the tensor-parallel split and a condition ("qkv_bias",
"qk_norm", "untied", "adapter"). ``convert.mapping`` validates checkpoints against bound rules and streams them.

Megatron layouts (megatron-core 0.16 ``SelfAttention.get_query_key_value_tensors``, ``MLP``):
  linear_qkv.weight [ng * (np/ng + 2) * hn, h]: group-major rows, per KV group [its np/ng query heads, k, v].
  linear_fc1.weight [2 * ffn, h] = [gate; up]; on tp rank r the local tensor is [gate_r; up_r].
  word_embeddings / output_layer [padded_vocab, h], rows >= vocab_size are zero padding (dropped on export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dms_megatron.families.block import ConversionError, HFNames

# symbolic dimension -> ModelConfig-derived size
DIMS: Dict[str, Callable[[object], int]] = {
    "hidden": lambda c: c.hidden_size,
    "ffn": lambda c: c.ffn_hidden_size,
    "vocab": lambda c: c.vocab_size,
    "head_dim": lambda c: c.kv_channels,
    "q_out": lambda c: c.num_attention_heads * c.kv_channels,
    "kv_out": lambda c: c.num_query_groups * c.kv_channels,
    "kv_heads": lambda c: c.num_query_groups,
}

# How a megatron tensor is split over tensor-parallel ranks.
TP_REPLICATED, TP_ROWS, TP_COLS, TP_GATED = "replicated", "rows", "cols", "gated"


# ---------------------------------------------------------------------------------------------------------------
# transforms: pure tensor functions (list of HF tensors) <-> one megatron tensor
# ---------------------------------------------------------------------------------------------------------------
class Transform:
    """One-to-one copy. Subclasses fuse several HF tensors into one megatron tensor."""

    def to_megatron(self, hf: Sequence[torch.Tensor], cfg) -> torch.Tensor:
        return hf[0]

    def to_hf(self, t: torch.Tensor, cfg) -> List[torch.Tensor]:
        return [t]


class Copy(Transform):
    pass


class VocabPad(Transform):
    """HF [vocab, h] <-> megatron [padded_vocab, h]: zero rows appended on import, removed on export."""

    def to_megatron(self, hf, cfg):
        (w,) = hf
        pad = cfg.padded_vocab_size() - w.shape[0]  # the full (tp=1) tensor
        if pad < 0:
            raise ConversionError(f"vocab tensor has {w.shape[0]} rows > padded vocab {cfg.padded_vocab_size()}")
        return torch.cat([w, w.new_zeros(pad, *w.shape[1:])]) if pad else w

    def to_hf(self, t, cfg):
        return [t[: cfg.vocab_size]]

    @staticmethod
    def fill_shard(w: torch.Tensor, dst: torch.Tensor, tp: int, rank: int) -> None:
        """Write rank ``rank``'s rows of the padded tensor into ``dst`` without building the padded tensor."""
        rows = dst.shape[0]
        lo, hi = rank * rows, min((rank + 1) * rows, w.shape[0])
        n = max(hi - lo, 0)
        if n:
            dst[:n].copy_(w[lo:hi])
        dst[n:].zero_()


class FusedQKV(Transform):
    """HF q [np*hn, ...], k [ng*hn, ...], v [ng*hn, ...] <-> megatron group-major [ng*(np/ng+2)*hn, ...].

    Works for weights ([out, h]) and biases ([out]).
    """

    def to_megatron(self, hf, cfg):
        q, k, v = hf
        ng, hn, r = cfg.num_query_groups, cfg.kv_channels, cfg.gqa_factor
        rest = q.shape[1:]
        q = q.reshape(ng, r * hn, *rest)
        k = k.reshape(ng, hn, *rest)
        v = v.reshape(ng, hn, *rest)
        return torch.cat([q, k, v], dim=1).reshape(ng * (r + 2) * hn, *rest)

    def to_hf(self, t, cfg):
        ng, hn, r = cfg.num_query_groups, cfg.kv_channels, cfg.gqa_factor
        rest = t.shape[1:]
        g = t.reshape(ng, (r + 2) * hn, *rest)
        q, k, v = torch.split(g, [r * hn, hn, hn], dim=1)
        return [q.reshape(ng * r * hn, *rest), k.reshape(ng * hn, *rest), v.reshape(ng * hn, *rest)]


class GatedMLP(Transform):
    """HF gate_proj [ffn, h], up_proj [ffn, h] <-> megatron linear_fc1 [2*ffn, h] = [gate; up]."""

    def to_megatron(self, hf, cfg):
        gate, up = hf
        return torch.cat([gate, up], dim=0)

    def to_hf(self, t, cfg):
        gate, up = torch.chunk(t, 2, dim=0)
        return [gate, up]


# ---------------------------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """megatron <- transform -> hf. Names may contain ``{i}`` (layer index). ``te_name`` is the name of the same
    tensor in transformer-engine layer specs (norms fused into the following linear), when it differs."""

    megatron: str
    hf: Tuple[str, ...]
    hf_shapes: Tuple[Tuple[str, ...], ...]
    transform: Transform = Copy()
    tp: str = TP_REPLICATED
    when: Optional[str] = None
    te_name: Optional[str] = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron


@dataclass(frozen=True)
class BoundRule:
    """A rule for one concrete layer (or a global tensor): concrete names and shapes."""

    rule: Rule
    megatron: str
    hf: Tuple[str, ...]
    hf_shapes: Tuple[Tuple[int, ...], ...]
    layer: Optional[int]


def decoder_rules(n: HFNames) -> Tuple[Rule, ...]:
    """The rules of a Llama-shaped decoder whose HF tensors carry the names ``n``, in HF checkpoint order (megatron
    names: megatron-core GPTModel with the local spec; ``te_name``: the transformer-engine spec's)."""
    L = "decoder.layers.{i}."
    w = n.weight
    return (
        Rule("embedding.word_embeddings.weight", (w("embed"),), (("vocab", "hidden"),), VocabPad(), tp=TP_ROWS),
        Rule(L + "input_layernorm.weight", (w("input_norm"),), (("hidden",),),
             te_name=L + "self_attention.linear_qkv.layer_norm_weight"),
        Rule(L + "self_attention.linear_qkv.weight", (w("q"), w("k"), w("v")),
             (("q_out", "hidden"), ("kv_out", "hidden"), ("kv_out", "hidden")), FusedQKV(), tp=TP_ROWS),
        Rule(L + "self_attention.linear_qkv.bias", (n.bias("q"), n.bias("k"), n.bias("v")),
             (("q_out",), ("kv_out",), ("kv_out",)), FusedQKV(), tp=TP_ROWS, when="qkv_bias"),
        Rule(L + "self_attention.q_layernorm.weight", (w("q_norm"),), (("head_dim",),), when="qk_norm"),
        Rule(L + "self_attention.k_layernorm.weight", (w("k_norm"),), (("head_dim",),), when="qk_norm"),
        Rule(L + "self_attention.linear_proj.weight", (w("o"),), (("hidden", "q_out"),), tp=TP_COLS),
        Rule(L + "self_attention.dms_alpha_norm.weight", (w("dms_alpha_norm"),), (("hidden",),), when="adapter"),
        Rule(L + "self_attention.dms_alpha_proj.weight", (w("dms_alpha_proj"),), (("kv_heads", "hidden"),),
             tp=TP_ROWS, when="adapter"),
        Rule(L + "pre_mlp_layernorm.weight", (w("mlp_norm"),), (("hidden",),),
             te_name=L + "mlp.linear_fc1.layer_norm_weight"),
        Rule(L + "mlp.linear_fc1.weight", (w("gate"), w("up")), (("ffn", "hidden"), ("ffn", "hidden")), GatedMLP(),
             tp=TP_GATED),
        Rule(L + "mlp.linear_fc2.weight", (w("down"),), (("hidden", "ffn"),), tp=TP_COLS),
        Rule("decoder.final_layernorm.weight", (w("final_norm"),), (("hidden",),)),
        Rule("output_layer.weight", (w("head"),), (("vocab", "hidden"),), VocabPad(), tp=TP_ROWS, when="untied"),
    )


def rule_enabled(rule: Rule, cfg, adapter: bool) -> bool:
    flags = {None: True, "qkv_bias": cfg.add_qkv_bias, "qk_norm": cfg.qk_layernorm,
             "untied": not cfg.tie_embeddings, "adapter": adapter}
    if rule.when not in flags:
        raise ValueError(f"rule {rule.megatron}: unknown condition when={rule.when!r}")
    return flags[rule.when]


def bind_rules(rules: Sequence[Rule], cfg, *, adapter: bool = False, te: bool = False) -> List[BoundRule]:
    """Concrete rules for every layer of ``cfg`` (a ModelConfig), in HF checkpoint order (globals first, layers,
    then head)."""
    out: List[BoundRule] = []

    def bind(rule: Rule, i: Optional[int]) -> BoundRule:
        name = rule.te_name if (te and rule.te_name) else rule.megatron
        fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
        shapes = tuple(tuple(DIMS[d](cfg) for d in shp) for shp in rule.hf_shapes)
        return BoundRule(rule, fmt(name), tuple(fmt(h) for h in rule.hf), shapes, i)

    active = [r for r in rules if rule_enabled(r, cfg, adapter)]
    head = [r for r in active if not r.per_layer and not r.megatron.startswith("embedding.")]
    out += [bind(r, None) for r in active if r.megatron.startswith("embedding.")]
    for i in range(cfg.num_layers):
        out += [bind(r, i) for r in active if r.per_layer]
    out += [bind(r, None) for r in head]
    return out


__all__ = ["Rule", "BoundRule", "Transform", "Copy", "VocabPad", "FusedQKV", "GatedMLP", "decoder_rules",
           "rule_enabled", "bind_rules", "DIMS", "TP_REPLICATED", "TP_ROWS", "TP_COLS", "TP_GATED"]

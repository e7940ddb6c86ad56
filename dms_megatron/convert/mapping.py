"""Declarative HF <-> megatron-core weight mappings: a small typed transform vocabulary and the generic engine.

A family file (llama.py, qwen2.py, qwen3.py) declares a list of ``Rule``s: a megatron name and one or more HF names
(``{i}`` = layer index), the HF shapes (symbolic, resolved from the ModelConfig), the transform between them, and a
condition ("qkv_bias", "qk_norm", "untied", "adapter"). The engine binds the rules to a concrete model, validates a
HF checkpoint against them (missing / extra / wrongly shaped tensors fail before anything is converted), streams
tensors in either direction, and splits / merges megatron tensors for tensor and pipeline parallel ranks.

Megatron layouts (megatron-core 0.16 ``SelfAttention.get_query_key_value_tensors``, ``MLP``):
  linear_qkv.weight [ng * (np/ng + 2) * hn, h]: group-major rows, per KV group [its np/ng query heads, k, v].
  linear_fc1.weight [2 * ffn, h] = [gate; up]; on tp rank r the local tensor is [gate_r; up_r].
  word_embeddings / output_layer [padded_vocab, h], rows >= vocab_size are zero padding (dropped on export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dms_megatron.config import DMSConfig, ModelConfig
from dms_megatron.convert.hf_io import ConversionError, PlannedTensor
from dms_megatron.core.rope import LLAMA3_ROPE

# symbolic dimension -> ModelConfig-derived size
DIMS: Dict[str, Callable[[ModelConfig], int]] = {
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

    def to_megatron(self, hf: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
        return hf[0]

    def to_hf(self, t: torch.Tensor, cfg: ModelConfig) -> List[torch.Tensor]:
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


def rule_enabled(rule: Rule, cfg: ModelConfig, adapter: bool) -> bool:
    flags = {None: True, "qkv_bias": cfg.add_qkv_bias, "qk_norm": cfg.qk_layernorm,
             "untied": not cfg.tie_embeddings, "adapter": adapter}
    if rule.when not in flags:
        raise ValueError(f"rule {rule.megatron}: unknown condition when={rule.when!r}")
    return flags[rule.when]


def bind_rules(rules: Sequence[Rule], cfg: ModelConfig, *, adapter: bool = False, te: bool = False) -> List[BoundRule]:
    """Concrete rules for every layer of ``cfg``, in HF checkpoint order (globals first, layers, then head)."""
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


# names some HF checkpoints carry that hold no weights (recomputed buffers)
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def validate_hf_tensors(bound: Sequence[BoundRule], available: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
                        source: str) -> None:
    """Every expected HF tensor present with its expected shape, and nothing else (one-line ConversionError; a DMS
    adapter tensor too many or too few says so)."""
    expected = {}
    for b in bound:
        for name, shape in zip(b.hf, b.hf_shapes):
            expected[name] = shape
    missing = [n for n in expected if n not in available]
    if missing:
        hint = ("the checkpoint has no DMS adapter: load it with its own DMS settings or as a plain model"
                if "dms_proj_alpha" in missing[0] else "the checkpoint does not match its config.json")
        raise ConversionError(f"tensor {missing[0]!r} is missing from {source} ({len(missing)} missing): {hint}")
    extra = [n for n in available if n not in expected and not n.endswith(IGNORED_HF_SUFFIXES)]
    if extra:
        hint = ("a DMS adapter checkpoint: pass its DMS config" if "dms_proj_alpha" in extra[0] else
                "unsupported architecture variant or wrong config.json")
        raise ConversionError(f"unexpected tensor {extra[0]!r} in {source} ({len(extra)} unexpected): {hint}")
    for name, shape in expected.items():
        if tuple(available[name][0]) != shape:
            raise ConversionError(f"tensor {name!r} in {source} has shape {list(available[name][0])}, "
                                  f"expected {list(shape)} from config.json")


def export_plan(bound: Sequence[BoundRule], dtype_of: Callable[[BoundRule], torch.dtype]) -> List[PlannedTensor]:
    return [PlannedTensor(n, s, dtype_of(b)) for b in bound for n, s in zip(b.hf, b.hf_shapes)]


class ExportProducer:
    """``produce(hf_name)`` for the streaming writer: computes a rule's HF tensors from its megatron tensor when its
    first HF name is requested and hands them out one by one (at most one rule's outputs are held)."""

    def __init__(self, bound: Sequence[BoundRule], get_megatron: Callable[[str], torch.Tensor], cfg: ModelConfig,
                 dtype: Optional[torch.dtype] = None) -> None:
        self.by_hf = {n: b for b in bound for n in b.hf}
        self.get_megatron, self.cfg, self.dtype = get_megatron, cfg, dtype
        self.pending: Dict[str, torch.Tensor] = {}

    def __call__(self, hf_name: str) -> torch.Tensor:
        if hf_name not in self.pending:
            b = self.by_hf[hf_name]
            outs = b.rule.transform.to_hf(self.get_megatron(b.megatron), self.cfg)
            self.pending = {n: (o if self.dtype is None else o.to(self.dtype)) for n, o in zip(b.hf, outs)}
        return self.pending.pop(hf_name)


# ---------------------------------------------------------------------------------------------------------------
# tensor / pipeline parallel shards (pure tensor work)
# ---------------------------------------------------------------------------------------------------------------
def pp_layer_range(cfg: ModelConfig, pp: int, pp_rank: int) -> range:
    """Global layers held by pipeline stage ``pp_rank`` (megatron's even split)."""
    if cfg.num_layers % pp:
        raise ConversionError(f"model.num_layers={cfg.num_layers} is not divisible by --pp {pp}")
    n = cfg.num_layers // pp
    return range(pp_rank * n, (pp_rank + 1) * n)


def tp_shard(t: torch.Tensor, kind: str, tp: int, rank: int) -> torch.Tensor:
    """The slice of full megatron tensor ``t`` held by tensor-parallel rank ``rank``."""
    if tp == 1 or kind == TP_REPLICATED:
        return t
    if kind == TP_ROWS:
        return torch.chunk(t, tp, dim=0)[rank]
    if kind == TP_COLS:
        return torch.chunk(t, tp, dim=1)[rank]
    if kind == TP_GATED:
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, dim=0)[rank], torch.chunk(up, tp, dim=0)[rank]])
    raise ValueError(f"unknown tensor-parallel split {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# families and the family-independent pieces (DMS adapter tensors, DMS config keys, shared HF config fields)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilySpec:
    """One model family: its HF identifiers, weight rules and config translation both ways."""

    name: str
    model_type: str
    architecture: str
    rules: Tuple[Rule, ...]
    from_hf: Callable[[dict, int], ModelConfig]   # (config.json dict, make_vocab_size_divisible_by) -> ModelConfig
    to_hf: Callable[[ModelConfig], dict]          # ModelConfig -> config.json fields of this family


DMS_ADAPTER_RULES = (
    Rule("decoder.layers.{i}.self_attention.dms_alpha_norm.weight",
         ("model.layers.{i}.self_attn.dms_proj_alpha_norm.weight",), (("hidden",),), when="adapter"),
    Rule("decoder.layers.{i}.self_attention.dms_alpha_proj.weight",
         ("model.layers.{i}.self_attn.dms_proj_alpha.weight",), (("kv_heads", "hidden"),), tp=TP_ROWS,
         when="adapter"),
)

# Official Qwen3-DMS Hugging Face format (configuration_qwen3_dms.Qwen3ConfigDMS / train.py AUTO_MAP_CONFIG).
DMS_AUTO_MAP = {
    "AutoConfig": "configuration_qwen3_dms.Qwen3ConfigDMS",
    "AutoModel": "modeling_qwen3_dms.Qwen3ModelDMS",
    "AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3ForCausalLMDMS",
    "AutoModelForQuestionAnswering": "modeling_qwen3_dms.Qwen3ForQuestionAnsweringDMS",
    "AutoModelForSequenceClassification": "modeling_qwen3_dms.Qwen3ForSequenceClassificationDMS",
    "AutoModelForTokenClassification": "modeling_qwen3_dms.Qwen3ForTokenClassificationDMS",
}
# The official config asserts dms_window_size > dms_paged_attention_block_size (default 256).
DMS_DEFAULT_BLOCK = 256


def dms_to_hf(dms) -> dict:
    """DMSConfig -> the dms_* keys of the official HF config (dms_cr documents the final compression ratio)."""
    block = DMS_DEFAULT_BLOCK
    while block >= dms.window and block > 1:
        block //= 2
    cr = int(dms.final_cr) if float(dms.final_cr).is_integer() else float(dms.final_cr)
    return {
        "dms_alpha_scale": float(dms.alpha_scale), "dms_initial_alpha_offset": float(dms.alpha_offset),
        "dms_window_size": int(dms.window), "dms_paged_attention_block_size": block, "dms_cr": cr,
        "dms_disable_eviction": False, "dms_separate_alpha": dms.alpha_source == "adapter",
        "dms_alpha_per": dms.alpha_per, "dms_tau": float(dms.tau),
    }


def dms_from_hf(hf: dict):
    """The DMSConfig recorded in a DMS-format config.json, or None for a plain model."""
    if "dms_window_size" not in hf:
        return None
    cr = float(hf.get("dms_cr", 1.0))
    d = DMSConfig()  # a key the file omits takes DMSConfig's default
    return DMSConfig(window=int(hf["dms_window_size"]),
                     alpha_source="adapter" if hf.get("dms_separate_alpha", False) else "qneuron",
                     alpha_per=hf.get("dms_alpha_per", d.alpha_per),
                     alpha_scale=float(hf.get("dms_alpha_scale", d.alpha_scale)),
                     alpha_offset=float(hf.get("dms_initial_alpha_offset", d.alpha_offset)),
                     tau=float(hf.get("dms_tau", d.tau)), initial_cr=1.0, final_cr=max(cr, 1.0))




def _require(hf: dict, key: str, where: str):
    if key not in hf:
        raise ConversionError(f"{where}: config.json has no {key!r}")
    return hf[key]


def rope_from_hf(hf: dict, where: str) -> dict:
    """rotary_base / rope_scaling / rope_scaling_factor from either the legacy (rope_theta + rope_scaling) or the
    transformers>=5 (rope_parameters) config layout; unsupported scalings fail naming the field."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if float(theta) != int(float(theta)):
        raise ConversionError(f"{where}: rope_theta={theta} is not an integer (megatron's rotary_base is an int)")
    rtype = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    out = {"rotary_base": float(theta), "rope_scaling": None}
    if rtype in (None, "default"):
        return out
    if rtype != "llama3":
        raise ConversionError(f"{where}: rope_scaling type {rtype!r} is not supported (only none and llama3)")
    for k, v in LLAMA3_ROPE.items():
        if float(scaling.get(k, v)) != v:
            raise ConversionError(f"{where}: rope_scaling.{k}={scaling.get(k)} differs from megatron-core's built-in "
                                  f"llama3 value {v}; this model cannot be represented exactly")
    out.update(rope_scaling="llama3", rope_scaling_factor=float(_require(scaling, "factor", where + " rope_scaling")))
    return out


def common_from_hf(hf: dict, family: str, divisible_by: int, **family_fields) -> ModelConfig:
    """ModelConfig fields shared by the Llama / Qwen2 / Qwen3 config.json layouts."""
    where = f"{family} config.json"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias", False):
        raise ConversionError(f"{where}: mlp_bias=true is not supported (megatron add_bias_linear=False)")
    heads = int(_require(hf, "num_attention_heads", where))
    hidden = int(_require(hf, "hidden_size", where))
    head_dim = hf.get("head_dim") or hidden // heads
    return ModelConfig(
        family=family, num_layers=int(_require(hf, "num_hidden_layers", where)), hidden_size=hidden,
        ffn_hidden_size=int(_require(hf, "intermediate_size", where)), num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads), kv_channels=int(head_dim),
        vocab_size=int(_require(hf, "vocab_size", where)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=divisible_by, init_method_std=float(hf.get("initializer_range", 0.02)),
        **rope_from_hf(hf, where), **family_fields,
    )


def common_to_hf(cfg: ModelConfig, spec_arch: str, model_type: str) -> dict:
    """config.json fields shared by the three families (legacy rope keys: read by transformers 4.x and 5.x)."""
    rope = None
    if cfg.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_ROPE}
    return {
        "architectures": [spec_arch], "model_type": model_type, "hidden_act": "silu",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.kv_channels, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base, "rope_scaling": rope, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_method_std, "attention_dropout": 0.0,
    }


__all__ = ["Rule", "BoundRule", "Transform", "Copy", "VocabPad", "FusedQKV", "GatedMLP", "bind_rules",
           "validate_hf_tensors", "export_plan", "ExportProducer", "tp_shard", "pp_layer_range",
           "TP_REPLICATED", "TP_ROWS", "TP_COLS", "TP_GATED", "DIMS", "FamilySpec", "DMS_ADAPTER_RULES",
           "DMS_AUTO_MAP", "dms_to_hf", "dms_from_hf", "rope_from_hf", "common_from_hf", "common_to_hf",
           "IGNORED_HF_SUFFIXES"]

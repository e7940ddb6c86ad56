"""``Family``: everything about one architecture in one value (its HF identifiers, block, tensor names, weight rules,
the config.json settings it refuses and writes, its export ``auto_map``), and the HF config.json reading and
writing every Llama-shaped family shares. A family file (``families/<name>.py``) declares one ``FAMILY``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from dms_megatron.core.rope import LLAMA3_ROPE
from dms_megatron.families.block import Block, ConversionError, HFNames
from dms_megatron.families.rules import Rule, decoder_rules


@dataclass(frozen=True)
class Family:
    """One model family. ``from_hf`` reads a config.json into ModelConfig fields, ``to_hf`` writes one."""

    name: str
    architecture: str                                       # HF ``architectures`` entry (the transformers class)
    model_type: str = ""                                    # HF ``model_type``; default: ``name``
    block: Block = Block()
    names: HFNames = HFNames()
    refused: Mapping[str, str] = field(default_factory=dict)  # config.json key -> why a true value is refused
    hf_fixed: Mapping[str, object] = field(default_factory=dict)  # config.json keys every export writes
    llama3_rope: bool = True                                # whether rope_scaling llama3 is one of its settings
    dms_auto_map: Optional[Mapping[str, str]] = None        # --format dms: the official DMS modeling code's auto_map
    rules: Tuple[Rule, ...] = ()                            # HF <-> megatron weights; default: from ``names``

    def __post_init__(self) -> None:
        if not self.model_type:
            object.__setattr__(self, "model_type", self.name)
        if not self.rules:
            object.__setattr__(self, "rules", decoder_rules(self.names))

    def config_fields(self) -> dict:
        """The ModelConfig fields the family fixes: its name and its block's attention biases and q/k norms."""
        return {"family": self.name, "add_qkv_bias": self.block.qkv_bias, "qk_layernorm": self.block.qk_norm}

    def from_hf(self, hf: dict) -> dict:
        """ModelConfig fields (all but make_vocab_size_divisible_by) of a config.json of this family; one-line
        ConversionError naming a setting the family's support does not cover."""
        where = f"{self.name} config.json"
        for key, why in self.refused.items():
            if hf.get(key):
                raise ConversionError(f"{where}: {key}={json.dumps(hf[key])} {why}")
        act = hf.get("hidden_act", self.block.activation)
        if act != self.block.activation:
            raise ConversionError(f"{where}: hidden_act={act!r} is not supported (gated MLP with "
                                  f"{self.block.activation} only)")
        if hf.get("mlp_bias", False):
            raise ConversionError(f"{where}: mlp_bias=true is not supported (megatron add_bias_linear=False)")
        rope = rope_from_hf(hf, where)
        if rope["rope_scaling"] == "llama3" and not self.llama3_rope:
            raise ConversionError(f"{where}: rope_scaling llama3 is not a {self.name} setting")
        heads = int(_require(hf, "num_attention_heads", where))
        hidden = int(_require(hf, "hidden_size", where))
        return dict(
            num_layers=int(_require(hf, "num_hidden_layers", where)), hidden_size=hidden,
            ffn_hidden_size=int(_require(hf, "intermediate_size", where)), num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            kv_channels=int(hf.get("head_dim") or hidden // heads), vocab_size=int(_require(hf, "vocab_size", where)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_method_std=float(hf.get("initializer_range", 0.02)), **rope, **self.config_fields(),
        )

    def to_hf(self, cfg) -> dict:
        """config.json of ModelConfig ``cfg`` (legacy rope keys: read by transformers 4.x and 5.x)."""
        rope = None
        if cfg.rope_scaling == "llama3":
            rope = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_ROPE}
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "hidden_act": self.block.activation,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.kv_channels, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
            "rope_theta": cfg.rotary_base, "rope_scaling": rope, "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_method_std, "attention_dropout": 0.0, **self.hf_fixed,
        }


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


__all__ = ["Family", "rope_from_hf"]

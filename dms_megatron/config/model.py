"""Architecture of a decoder-only transformer of one of the registered model families (``dms_megatron.families``,
one file each: its block, HF names, weight rules and config.json translation)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Optional

import yaml

from dms_megatron.config.base import ConfigError, check_choice, check_ints, fail
from dms_megatron.families import FAMILIES, family_for_hf_config

SPECS = ("local", "te")


@dataclass
class ModelConfig:
    """Architecture. The shape fields (``REQUIRED``) have no default: a preset (``configs/model/<name>.yaml``) or
    caller gives every one of them, or a re-fit from ``train.init_checkpoint`` reads the ones it leaves unset from
    the checkpoint. "Set" means the composed config gives the field a value (the preset yaml or a ``model.X=``
    override); "unset" means it is MISSING (Hydra's ``???``: the schema has no default) or absent from a dict.
    An unset field without a checkpoint to read it from is a one-line error naming the field and the preset. The
    tiny teacher's sizes live in ``configs/model/tiny.yaml`` (``TINY_TEACHER``), nowhere else.

    kv_channels is the head dimension; null = hidden_size // num_attention_heads.
    num_query_groups is the number of KV heads (GQA); it must divide num_attention_heads.
    add_qkv_bias / qk_layernorm: null = the family's block (``families/<family>.py``); a value that contradicts it is
        refused.
    The other settings (RoPE, norm epsilon, init) have defaults; a re-fit builds the teacher with the checkpoint's.
    spec: megatron-core layer implementation: "local" (megatron's own modules) or "te" (Transformer Engine,
        needs the ``[gpu]`` extra). Not part of the architecture: the same weights load into either.
    """

    family: str  # a key of dms_megatron.families.FAMILIES
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: Optional[int]
    vocab_size: int
    max_position_embeddings: int
    tie_embeddings: bool
    rotary_base: float = 10000.0
    # Llama-3 style RoPE scaling ("llama3") or none.
    rope_scaling: Optional[str] = None
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    add_qkv_bias: Optional[bool] = None
    qk_layernorm: Optional[bool] = None
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    spec: str = "local"

    def __post_init__(self) -> None:
        s = "model"
        check_choice(s, "family", self.family, FAMILIES)
        check_choice(s, "spec", self.spec, SPECS)
        self._block_fields()
        check_ints(s, self, ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                             "num_query_groups", "vocab_size", "max_position_embeddings",
                             "make_vocab_size_divisible_by"))
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_query_groups={self.num_query_groups} (KV heads) must divide "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                                  f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels (the "
                                  f"head dimension) explicitly")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.kv_channels < 2 or self.kv_channels % 2:
            fail(s, "kv_channels", self.kv_channels, "head dimension must be an even integer >= 2 (RoPE)")
        if self.rope_scaling not in (None, "llama3"):
            fail(s, "rope_scaling", self.rope_scaling, "allowed values: null, llama3")

    def _block_fields(self) -> None:
        """add_qkv_bias / qk_layernorm from the family's block; one line for a value that contradicts it."""
        for name, value in FAMILIES[self.family].config_fields().items():
            if name == "family":
                continue
            if getattr(self, name) is None:
                setattr(self, name, value)
            elif getattr(self, name) != value:
                raise ConfigError(f"model.{name}={str(getattr(self, name)).lower()} contradicts model.family="
                                  f"{self.family}, whose block has {name}={str(value).lower()} (leave it unset)")

    @classmethod
    def from_hf(cls, hf: dict, divisible_by: int, source: str = "config.json") -> "ModelConfig":
        """The architecture of a Hugging Face config.json dict, read by its family (found from ``architectures``,
        else ``model_type``); ConversionError for an unknown family or a setting it refuses."""
        return cls(**family_for_hf_config(hf, source).from_hf(hf), make_vocab_size_divisible_by=divisible_by)

    @property
    def gqa_factor(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Rows of the embedding / output layer at tensor-parallel size ``tp``: vocab_size rounded up to a multiple
        of make_vocab_size_divisible_by * tp (Megatron-LM's rule, so shapes match its checkpoints). Rows from
        vocab_size on are zero padding; checkpoints load across layouts whose padding differs."""
        m = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + m - 1) // m) * m


#: Fields without a default: a preset gives them, or a re-fit reads the unset ones from its checkpoint.
REQUIRED = tuple(f.name for f in fields(ModelConfig) if f.default is MISSING)

#: The embedded tiny teacher (``dms_megatron/assets/tiny_teacher``, pre-trained by ``training.pretrain``): its
#: preset, configs/model/tiny.yaml, is where its sizes live.
TINY_PRESET = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
TINY_TEACHER = ModelConfig(**yaml.safe_load(TINY_PRESET.read_text()))

#: Fields that define the weights (a checkpoint loads only into a model that agrees on all of them).
ARCH_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "vocab_size", "add_qkv_bias", "qk_layernorm", "tie_embeddings")


def check_same_arch(a: ModelConfig, b: ModelConfig, where: str) -> None:
    """One-line ConfigError naming every architecture field where ``a`` (the config) and ``b`` (``where``) differ."""
    diff = [f"{f}: config {getattr(a, f)} vs {where} {getattr(b, f)}" for f in ARCH_FIELDS
            if getattr(a, f) != getattr(b, f)]
    if diff:
        raise ConfigError(f"model config does not match {where}: " + "; ".join(diff))


__all__ = ["ModelConfig", "SPECS", "REQUIRED", "TINY_TEACHER", "ARCH_FIELDS", "check_same_arch"]

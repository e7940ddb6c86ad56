"""Validated configuration dataclasses shared by every layer of the package.

These are plain dataclasses (no Hydra import): the launcher registers them in Hydra's ConfigStore, workers
rebuild them from the resolved YAML. Every invalid value raises ``ConfigError`` at construction time with a
one-line message naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


def _fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{section}.{name}={value!r} is invalid: {allowed}")


ALPHA_SOURCES = ("qneuron", "adapter")
ALPHA_PER = ("head", "layer")
BACKENDS = ("dense", "flex")
FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass
class DMSConfig:
    """Dynamic Memory Sparsification settings of one model (all layers share them).

    window: w, the delayed-eviction window: a key flagged for eviction stays visible to the w queries after it
        (the last w+1 tokens are always visible), then it is dropped.
    alpha_source: "qneuron" borrows the last dimension of the first query head of each GQA group (zero new
        parameters; the neuron is zeroed before and after RoPE); "adapter" adds RMSNorm + Linear(hidden -> kv_heads)
        on the pre-attention-norm residual stream, zero-initialised.
    alpha_per: "head" (a decision per KV head) or "layer" (KV head 0's decision applies to all heads).
    alpha_scale, alpha_offset: decision logit = source * alpha_scale - alpha_offset.
    tau: Gumbel-sigmoid temperature during training.
    backend: "dense" (additive bias + SDPA; CPU training and the reference) or "flex" (FlexAttention score_mod).
    teacher_mode: eviction off and the borrowed neuron left in place: the module computes the original model.
    initial_cr, final_cr, final_step: the compression-ratio schedule, linear from initial_cr at step 0 to final_cr
        at final_step (constant after). The target evicted fraction is 1 - 1/CR.
    """

    window: int = 16
    alpha_source: str = "qneuron"
    alpha_per: str = "head"
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    tau: float = 0.1
    backend: str = "dense"
    teacher_mode: bool = False
    initial_cr: float = 1.0
    final_cr: float = 4.0
    final_step: int = 100

    def __post_init__(self) -> None:
        s = "dms"
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            _fail(s, "window", self.window, "must be an integer >= 1")
        if self.alpha_source not in ALPHA_SOURCES:
            _fail(s, "alpha_source", self.alpha_source, f"allowed values: {', '.join(ALPHA_SOURCES)}")
        if self.alpha_per not in ALPHA_PER:
            _fail(s, "alpha_per", self.alpha_per, f"allowed values: {', '.join(ALPHA_PER)}")
        if self.backend not in BACKENDS:
            _fail(s, "backend", self.backend, f"allowed values: {', '.join(BACKENDS)}")
        if not self.tau > 0:
            _fail(s, "tau", self.tau, "must be > 0 (Gumbel-sigmoid temperature, 0.1 in the paper)")
        if not self.alpha_scale > 0:
            _fail(s, "alpha_scale", self.alpha_scale, "must be > 0")
        if self.initial_cr < 1:
            _fail(s, "initial_cr", self.initial_cr, "compression ratio must be >= 1")
        if self.final_cr < 1:
            _fail(s, "final_cr", self.final_cr, "compression ratio must be >= 1")
        if not isinstance(self.final_step, int) or self.final_step <= 0:
            _fail(s, "final_step", self.final_step, "must be an integer > 0 (step at which final_cr is reached)")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama / Qwen2 / Qwen3 family).

    kv_channels is the head dimension (defaults to hidden_size // num_attention_heads).
    num_query_groups is the number of KV heads (GQA); it must divide num_attention_heads.
    """

    family: str = "llama"
    num_layers: int = 4
    hidden_size: int = 256
    ffn_hidden_size: int = 688
    num_attention_heads: int = 8
    num_query_groups: int = 2
    kv_channels: Optional[int] = None
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    # Llama-3 style RoPE scaling ("llama3") or none.
    rope_scaling: Optional[str] = None
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        s = "model"
        if self.family not in FAMILIES:
            _fail(s, "family", self.family, f"allowed values: {', '.join(FAMILIES)}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(s, name, v, "must be an integer >= 1")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups={self.num_query_groups} (KV heads) must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                    f"{self.num_attention_heads}; set model.kv_channels (the head dimension) explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.kv_channels < 2 or self.kv_channels % 2:
            _fail(s, "kv_channels", self.kv_channels, "head dimension must be an even integer >= 2 (RoPE)")
        if self.rope_scaling not in (None, "llama3"):
            _fail(s, "rope_scaling", self.rope_scaling, "allowed values: null, llama3")

    @property
    def gqa_factor(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return ((self.vocab_size + m - 1) // m) * m


def from_dict(cls, data: Optional[dict]) -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys (typos fail loudly)."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {unknown} for {cls.__name__}; allowed: {', '.join(sorted(known))}"
        )
    return cls(**data)


__all__ = ["ConfigError", "DMSConfig", "ModelConfig", "from_dict", "field"]

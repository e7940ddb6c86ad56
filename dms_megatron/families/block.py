"""What a model family is made of, as data: its decoder block (norm, MLP activation, attention biases, q/k norms)
and the Hugging Face names of its tensors. megatron's layer spec, the HF <-> megatron weight rules and the pure-torch
inference decoder all read these; none of them names a family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from dms_megatron.core.norms import rms_norm

#: norm name (megatron-core's ``normalization``) -> the decoder's function (x, weight, eps)
NORMS: Dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {"RMSNorm": rms_norm}
#: activation name (HF's ``hidden_act``) -> the function of the gated MLP, act(gate) * up
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu}


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted; the one-line message names the tensor / file / field and the fix."""


@dataclass(frozen=True)
class Block:
    """A family's decoder block: pre-norm attention (RoPE, GQA) and a gated MLP, no bias on the output projection
    or the MLP. ``qkv_bias`` / ``qk_norm`` are what the family's checkpoints carry (``ModelConfig.add_qkv_bias`` /
    ``qk_layernorm`` of a model read from one)."""

    norm: str = "RMSNorm"         # a key of NORMS (and megatron-core's normalization name)
    activation: str = "silu"      # a key of ACTIVATIONS (and the HF hidden_act it reads)
    qkv_bias: bool = False        # bias on the q / k / v projections (Qwen2)
    qk_norm: bool = False         # per-head norm of queries and keys before RoPE (Qwen3)

    def __post_init__(self) -> None:
        for what, value, known in (("norm", self.norm, NORMS), ("activation", self.activation, ACTIVATIONS)):
            if value not in known:
                raise ValueError(f"Block.{what}={value!r}: known values {', '.join(known)} (add it to "
                                 f"dms_megatron/families/block.py)")


@dataclass(frozen=True)
class HFNames:
    """HF module paths of a family's tensors (``.weight`` / ``.bias`` appended; ``{i}`` = layer index). The defaults
    are Llama's, which Qwen2 / Qwen3 / Mistral share; the DMS adapter's are those of the official Qwen3-DMS format."""

    embed: str = "model.embed_tokens"
    input_norm: str = "model.layers.{i}.input_layernorm"
    q: str = "model.layers.{i}.self_attn.q_proj"
    k: str = "model.layers.{i}.self_attn.k_proj"
    v: str = "model.layers.{i}.self_attn.v_proj"
    o: str = "model.layers.{i}.self_attn.o_proj"
    q_norm: str = "model.layers.{i}.self_attn.q_norm"
    k_norm: str = "model.layers.{i}.self_attn.k_norm"
    dms_alpha_norm: str = "model.layers.{i}.self_attn.dms_proj_alpha_norm"
    dms_alpha_proj: str = "model.layers.{i}.self_attn.dms_proj_alpha"
    mlp_norm: str = "model.layers.{i}.post_attention_layernorm"
    gate: str = "model.layers.{i}.mlp.gate_proj"
    up: str = "model.layers.{i}.mlp.up_proj"
    down: str = "model.layers.{i}.mlp.down_proj"
    final_norm: str = "model.norm"
    head: str = "lm_head"

    def weight(self, role: str, i: Optional[int] = None) -> str:
        """The weight's name of module ``role`` (a field name); of layer ``i``, else with ``{i}`` left in."""
        return self._name(role, i, ".weight")

    def bias(self, role: str, i: Optional[int] = None) -> str:
        return self._name(role, i, ".bias")

    def _name(self, role: str, i: Optional[int], suffix: str) -> str:
        name = getattr(self, role) + suffix
        return name if i is None else name.format(i=i)


__all__ = ["Block", "HFNames", "ConversionError", "NORMS", "ACTIVATIONS"]

"""Per-forward DMS state shared by every DMS attention layer of a model (set by the trainer / evaluator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

MODES = ("train", "hard", "teacher")


@dataclass
class DMSRuntime:
    """What the DMS layers should do on the next forward, and what they observed.

    mode: "train" = Gumbel-sigmoid soft bias + straight-through hard decisions (noise keyed on seed/step/sample);
          "hard" = deterministic eviction of keys whose logit > 0 (inference-equivalent masking);
          "teacher" = no eviction, borrowed neuron left in place (the original model).
    sample_ids: [b] global sample indices (noise keys; default arange(b)). valid: bool [b, s] (False = padding).
    Filled by the forward, per global layer number:
      fractions[l]: [b] evicted fraction (differentiable in train mode), key_flags[l]: bool [b, ng_local, s]
      (final eviction flag of each key), logits[l]: [b, ng_local, s] raw decision logits (detached).
    """

    mode: str = "train"
    seed: int = 0
    step: int = 0
    sample_ids: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    record_flags: bool = True
    fractions: Dict[int, torch.Tensor] = field(default_factory=dict)
    key_flags: Dict[int, torch.Tensor] = field(default_factory=dict)
    logits: Dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DMSRuntime.mode={self.mode!r}: allowed values are {', '.join(MODES)}")

    def clear(self) -> None:
        """Forget what the previous forward recorded."""
        self.fractions.clear()
        self.key_flags.clear()
        self.logits.clear()

    def mean_fraction(self) -> torch.Tensor:
        """[b] evicted fraction averaged over the recorded layers (all layers of this pipeline stage)."""
        if not self.fractions:
            raise RuntimeError("no DMS layer recorded an evicted fraction: was the forward run in train/hard mode?")
        return torch.stack([self.fractions[k] for k in sorted(self.fractions)]).mean(0)


def attach_runtime(model: torch.nn.Module, runtime: Optional[DMSRuntime]) -> int:
    """Point every DMS attention module of ``model`` (a module or a list of chunks) at ``runtime``.

    Returns the number of DMS attention modules found (0 for a stock model).
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    n = 0
    for chunk in chunks:
        for m in chunk.modules():
            if getattr(m, "is_dms_attention", False):
                m.dms_runtime = runtime
                n += 1
    return n


__all__ = ["DMSRuntime", "attach_runtime", "MODES"]

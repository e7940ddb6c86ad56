"""Per-forward DMS state: the one source of what every DMS layer of a model does on a forward, and what it saw.

A DMS model has no mode of its own (neither ``module.training`` nor its config decides): each forward runs under

    with dms_forward(model, DMSRuntime(mode="train", step=step, sample_ids=ids)):
        logits = model(tokens, position_ids, None)

and a DMS layer that runs outside such a block raises. The block binds the runtime to every DMS attention module
for its duration only, so no state outlives the forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

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


def dms_modules(model) -> Iterator[torch.nn.Module]:
    """Every DMS attention module of ``model`` (a module or a list of model chunks)."""
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for m in chunk.modules():
            if getattr(m, "is_dms_attention", False):
                yield m


@contextlib.contextmanager
def dms_forward(model, runtime: DMSRuntime):
    """Run the DMS layers of ``model`` under ``runtime`` for the duration of the block (a stock model: no-op)."""
    mods = list(dms_modules(model))
    for m in mods:
        if m.dms_runtime is not None and m.dms_runtime is not runtime:
            raise RuntimeError("dms_forward blocks of one model may not nest with different runtimes")
        m.dms_runtime = runtime
    try:
        yield runtime
    finally:
        for m in mods:
            m.dms_runtime = None


__all__ = ["DMSRuntime", "dms_forward", "dms_modules", "MODES"]

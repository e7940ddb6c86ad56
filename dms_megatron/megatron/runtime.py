"""Per-forward DMS state: the one source of what every DMS layer of a model does on a forward, and what it saw.

A DMS model has no mode of its own (neither ``module.training`` nor its config decides): each forward runs under

    with dms_forward(model, DMSRuntime(mode="train", step=step, sample_ids=ids)):
        logits = model(tokens, position_ids, None)

and a DMS layer that runs outside such a block raises. The block binds the runtime to every DMS module (the layer,
its self-attention and its core attention) for its duration only, so no state outlives the forward.

The runtime is also the one side channel megatron-core's attention API leaves (its calls carry no argument for
DMS): inside a layer, the decision logits pass from the self-attention (computed before RoPE) to the core attention
(``send_decisions`` / ``take_decisions``, exactly once per forward of a layer) and the adapter reads the layer's
pre-norm input (``holding_input`` / ``layer_input``); the layers' observations come back through ``record``. Every
slot is keyed by the global layer number; nothing passes between modules any other way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import torch

from dms_megatron.core.masks import decisions_to_key_logits

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
    _decisions: Dict[int, Optional[torch.Tensor]] = field(default_factory=dict, repr=False)
    _inputs: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DMSRuntime.mode={self.mode!r}: allowed values are {', '.join(MODES)}")

    def clear(self) -> None:
        """Forget what the previous forward recorded (and any hand-off a failed forward left behind)."""
        for d in (self.fractions, self.key_flags, self.logits, self._decisions, self._inputs):
            d.clear()

    # -- inside one layer -------------------------------------------------------------------------------------------
    def send_decisions(self, layer: int, logits: Optional[torch.Tensor]) -> None:
        """Self-attention -> core attention: decision logits [s, b, ng_local] (None: teacher mode)."""
        if layer in self._decisions:
            raise RuntimeError("DMS decision logits sent twice without being consumed by the core attention")
        self._decisions[layer] = logits

    def take_decisions(self, layer: int) -> Optional[torch.Tensor]:
        if layer not in self._decisions:
            raise RuntimeError("DMS core attention ran without decision logits from its self-attention (build the "
                               "layer with get_gpt_layer_dms_spec)")
        return self._decisions.pop(layer)

    @contextlib.contextmanager
    def holding_input(self, layer: int, hidden: torch.Tensor):
        """The layer's pre-attention-norm input [s, b, h], readable by its adapter for the duration of the block."""
        if layer in self._inputs:
            raise RuntimeError("DMS adapter input held twice: attention calls of one layer may not nest")
        self._inputs[layer] = hidden
        try:
            yield
        finally:
            self._inputs.pop(layer, None)

    def layer_input(self, layer: int) -> torch.Tensor:
        if layer not in self._inputs:
            raise RuntimeError("DMS adapter needs the pre-norm hidden states: build the layer with "
                               "get_gpt_layer_dms_spec (DMSTransformerLayer)")
        return self._inputs[layer]

    def record(self, layer: int, fraction: torch.Tensor, decisions: torch.Tensor, logits: torch.Tensor) -> None:
        """What layer ``layer`` observed: evicted fraction [b]; with ``record_flags`` its final key flags and raw
        logits (decisions / logits [b, ng_local, s])."""
        self.fractions[layer] = fraction
        if self.record_flags:
            self.key_flags[layer] = decisions_to_key_logits(decisions.detach() > 0.5, fill=False)
            self.logits[layer] = logits.detach()

    # -- after the forward --------------------------------------------------------------------------------------------
    def mean_fraction(self) -> torch.Tensor:
        """[b] evicted fraction averaged over the recorded layers (all layers of this pipeline stage)."""
        if not self.fractions:
            raise RuntimeError("no DMS layer recorded an evicted fraction: was the forward run in train/hard mode?")
        return torch.stack([self.fractions[k] for k in sorted(self.fractions)]).mean(0)


class RuntimeBound:
    """A module that runs under the ``DMSRuntime`` bound by ``dms_forward`` (``runtime()`` raises outside one)."""

    uses_dms_runtime = True
    dms_runtime: Optional[DMSRuntime] = None

    def runtime(self) -> DMSRuntime:
        if self.dms_runtime is None:
            raise RuntimeError(f"DMS layer {getattr(self, 'layer_number', '?')} ran outside a DMS forward: run the "
                               f"model under `with dms_forward(model, DMSRuntime(mode=...))` "
                               f"(dms_megatron.megatron.runtime)")
        return self.dms_runtime


def dms_modules(model) -> Iterator[torch.nn.Module]:
    """Every DMS module of ``model`` (a module or a list of model chunks)."""
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for m in chunk.modules():
            if getattr(m, "uses_dms_runtime", False):
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


__all__ = ["DMSRuntime", "RuntimeBound", "dms_forward", "dms_modules", "MODES"]

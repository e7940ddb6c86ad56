"""Dynamic Memory Sparsification settings of one model (all layers share them)."""

from __future__ import annotations

from dataclasses import dataclass

from dms_megatron.config.base import check_choice, fail, is_int
from dms_megatron.core.attention import BACKENDS
from dms_megatron.core.losses import CR_LOSSES

ALPHA_SOURCES = ("qneuron", "adapter")
ALPHA_PER = ("head", "layer")


@dataclass
class DMSConfig:
    """DMS rule, parameterisation and schedule.

    window: w, the delayed-eviction window: a key flagged for eviction stays visible to the w queries after it
        (the last w+1 tokens are always visible), then it is dropped.
    alpha_source: "adapter" adds RMSNorm + Linear(hidden -> kv_heads) on the pre-attention-norm residual stream,
        zero-initialised (so nothing is evicted until the compression loss asks); "qneuron" borrows the last dimension
        of the first query head of each GQA group (zero new parameters; the neuron is zeroed before and after RoPE;
        the paper's choice for large models, ``dms=paper`` / ``dms=qneuron``).
    alpha_per: "head" (a decision per KV head) or "layer" (KV head 0's decision applies to all heads).
    alpha_scale, alpha_offset: decision logit = source * alpha_scale - alpha_offset.
    tau: Gumbel-sigmoid temperature during training.
    backend: the attention kernel (``dms_megatron.core.attention.BACKENDS``); "auto" picks the fastest exact
        kernel of the device once, when the model is built (``core.attention.resolve_backend_name``).
    initial_cr, final_cr, final_step: the compression-ratio schedule, linear from initial_cr at step 0 to final_cr
        at final_step (constant after). The target evicted fraction is 1 - 1/CR.
    cr_loss: "band" (the default) charges a sample's evicted fraction only where it leaves the band of
        CR x (1 - cr_band) .. CR x (1 + cr_band), on either side, so the CR delivered on held-out text is the one
        asked for; "one_sided" charges only the shortfall below CR (the paper's loss: evicting more than the target
        costs nothing, only the distillation loss holds it back; ``dms=paper``).
    cr_band: the relative CR tolerance around the target that the "band" loss leaves free.
    """

    window: int = 32
    alpha_source: str = "adapter"
    alpha_per: str = "head"
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    tau: float = 0.1
    backend: str = "auto"
    initial_cr: float = 1.0
    final_cr: float = 4.0
    final_step: int = 300
    cr_loss: str = "band"
    cr_band: float = 0.05

    def __post_init__(self) -> None:
        s = "dms"
        if not is_int(self.window, 1):
            fail(s, "window", self.window, "must be an integer >= 1")
        check_choice(s, "alpha_source", self.alpha_source, ALPHA_SOURCES)
        check_choice(s, "alpha_per", self.alpha_per, ALPHA_PER)
        check_choice(s, "backend", self.backend, ("auto", *BACKENDS))
        if not self.tau > 0:
            fail(s, "tau", self.tau, "must be > 0 (Gumbel-sigmoid temperature, 0.1 in the paper)")
        if not self.alpha_scale > 0:
            fail(s, "alpha_scale", self.alpha_scale, "must be > 0")
        for name in ("initial_cr", "final_cr"):
            if not getattr(self, name) >= 1:
                fail(s, name, getattr(self, name), "compression ratio must be >= 1")
        check_choice(s, "cr_loss", self.cr_loss, CR_LOSSES)
        if isinstance(self.cr_band, bool) or not isinstance(self.cr_band, (int, float)) or not 0 <= self.cr_band <= 1:
            fail(s, "cr_band", self.cr_band, "must be a number in [0, 1] (relative CR tolerance around the target)")
        if not is_int(self.final_step, 1):
            fail(s, "final_step", self.final_step, "must be an integer > 0 (step at which final_cr is reached)")


__all__ = ["DMSConfig", "ALPHA_SOURCES", "ALPHA_PER"]

"""DMS: learned delayed eviction. Token t's decision (logit > 0) flags token t-1; a flagged token stays readable by
the ``window`` following queries and is physically dropped once it is more than ``window`` positions behind."""

from __future__ import annotations

import dms_megatron.inference.cache as kv
from dms_megatron.inference.press.base import Press


class DMSPress(Press):
    name = "dms"
    required = ("window",)
    needs_decisions = True

    def __init__(self, window) -> None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"press dms: window={window!r} must be an integer >= 1 (the model's dms window)")
        self.window = window

    def new_flags(self, cache, rows, positions, decisions):
        if decisions is None:
            raise ValueError("press dms needs a DMS model (decision logits); this model has none: load it with its "
                             "DMS config or use press vanilla")
        kv.flag_previous(cache, rows, positions[:, 0], decisions[..., 0])
        return kv.chunk_flags(decisions)

    def after_attention(self, cache, rows, probs, newest):
        kv.drop(cache, rows, kv.expired(cache, rows, newest, self.window))


__all__ = ["DMSPress"]

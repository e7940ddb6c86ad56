"""StreamingLLM (attention sinks): keep the first ``sinks`` tokens plus the most recent ``budget - sinks``."""

from __future__ import annotations

from dms_megatron.inference.press.base import Press, check_budget, keep_top


class StreamingLLMPress(Press):
    name = "streamingllm"
    required = ("budget",)

    def __init__(self, budget, sinks: int) -> None:
        self.budget = check_budget(self.name, budget)
        if not 0 <= sinks < self.budget:
            raise ValueError(f"press streamingllm: sinks={sinks} must be >= 0 and < budget={self.budget}")
        self.sinks = sinks

    def after_attention(self, cache, rows, probs, newest):
        pos = cache.pos[rows].float()  # sinks rank first, then by recency
        key = pos.masked_fill(pos < self.sinks, float("inf"))
        keep_top(cache, rows, key, self.budget)


__all__ = ["StreamingLLMPress"]

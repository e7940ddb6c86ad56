"""TOVA (token omission via attention): over budget, drop the tokens the current (last) query attends to least,
attention averaged over the query heads of the KV group."""

from __future__ import annotations

from dms_megatron.inference.press.base import Press, check_budget, keep_top


class TOVAPress(Press):
    name = "tova"
    required = ("budget",)

    def __init__(self, budget) -> None:
        self.budget = check_budget(self.name, budget)

    def after_attention(self, cache, rows, probs, newest):
        keep_top(cache, rows, probs[:, :, :, -1].mean(2), self.budget)  # probs [n, ng, g, S, cap] -> [n, ng, cap]


__all__ = ["TOVAPress"]

"""H2O (heavy hitters): keep the ``recent`` newest tokens plus the tokens with the largest attention accumulated
over all queries so far (summed over the query heads of the KV group), ``budget`` in all."""

from __future__ import annotations

from dms_megatron.inference.press.base import Press, check_budget, keep_top


class H2OPress(Press):
    name = "h2o"
    required = ("budget",)

    def __init__(self, budget, recent: int) -> None:
        self.budget = check_budget(self.name, budget)
        self.recent = recent
        if not 0 <= self.recent <= self.budget:
            raise ValueError(f"press h2o: recent={self.recent} must lie in [0, budget={self.budget}]")

    def after_attention(self, cache, rows, probs, newest):
        acc = cache.score[rows] + probs.sum(dim=(2, 3))  # [n, ng, cap]
        cache.score[rows] = acc.masked_fill(cache.pos[rows] < 0, 0.0)
        is_recent = newest[:, None, None] - cache.pos[rows] < self.recent
        keep_top(cache, rows, acc.masked_fill(is_recent, float("inf")), self.budget)


__all__ = ["H2OPress"]

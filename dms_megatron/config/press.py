"""Settings of the budget methods (``inference/press``): the one place their defaults live. ``dms-generate`` builds
presses with these defaults, ``dms-eval`` with its ``press`` section (``dms-eval press.quest_page=16``)."""

from __future__ import annotations

from dataclasses import dataclass

from dms_megatron.config.base import check_ints, fail


@dataclass
class PressConfig:
    """streamingllm_sinks: the first tokens StreamingLLM always keeps (attention sinks; at most budget - 1 are kept).
    quest_page: Quest's page size in cache slots (at most the budget).
    h2o_recent_fraction: the share of H2O's budget held by the newest tokens (the rest: heavy hitters)."""

    streamingllm_sinks: int = 4
    quest_page: int = 4
    h2o_recent_fraction: float = 0.5

    def __post_init__(self) -> None:
        check_ints("press", self, ("streamingllm_sinks",), lo=0)
        check_ints("press", self, ("quest_page",), lo=1)
        if not isinstance(self.h2o_recent_fraction, (int, float)) or not 0 <= self.h2o_recent_fraction <= 1:
            fail("press", "h2o_recent_fraction", self.h2o_recent_fraction, "must be a number in [0, 1]")

    def kwargs(self, name: str, budget: int) -> dict:
        """The constructor settings of press ``name`` at ``budget`` tokens (sinks and page clamped to the budget)."""
        return {"streamingllm": {"sinks": min(self.streamingllm_sinks, budget - 1)},
                "quest": {"page": min(self.quest_page, budget)},
                "h2o": {"recent": int(budget * self.h2o_recent_fraction)}}.get(name, {})


__all__ = ["PressConfig"]

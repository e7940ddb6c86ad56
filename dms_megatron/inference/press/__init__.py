"""KV-cache methods ("presses"), one file each, and their registry (keyed once, by each class's ``name``).

The engine calls, per layer and step, for sequences ``rows`` [n] with S new tokens at positions [n, S]:
  new_flags(cache, rows, positions, decisions) -> bool [n, ng, S] eviction flags of the new tokens (before insert)
  read_mask(cache, rows, q, visible)           -> bool [n, ng, S, cap] slots the queries read (default: visible)
  after_attention(cache, rows, probs, newest)  -> drops entries (probs [n, ng, g, S, cap] attention weights)
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from dms_megatron.config import PressConfig
from dms_megatron.inference.press.base import Press, check_budget, keep_top
from dms_megatron.inference.press.dms import DMSPress
from dms_megatron.inference.press.h2o import H2OPress
from dms_megatron.inference.press.quest import QuestPress
from dms_megatron.inference.press.streamingllm import StreamingLLMPress
from dms_megatron.inference.press.tova import TOVAPress
from dms_megatron.inference.press.vanilla import VanillaPress

REGISTRY: Dict[str, Type[Press]] = {c.name: c for c in (VanillaPress, DMSPress, TOVAPress, H2OPress,
                                                         StreamingLLMPress, QuestPress)}
PRESSES = tuple(REGISTRY)


def make_press(name: str, *, budget: Optional[int] = None, window: Optional[int] = None,
               settings: Optional[PressConfig] = None, **kw) -> Press:
    """Build a press by name. dms needs ``window``; tova, h2o, streamingllm, quest need ``budget``. Sinks and page
    size come from ``settings`` (default ``PressConfig()``, clamped to the budget) unless given in ``kw``."""
    if name not in REGISTRY:
        raise ValueError(f"press {name!r} is unknown; allowed: {', '.join(PRESSES)}")
    cls = REGISTRY[name]
    given = {"budget": budget, "window": window}
    if "budget" in cls.required:
        kw = {**(settings or PressConfig()).kwargs(name, check_budget(name, budget)), **kw}
    return cls(*(given[a] for a in cls.required), **kw)


__all__ = ["Press", "make_press", "keep_top", "check_budget", "PRESSES", "REGISTRY"]

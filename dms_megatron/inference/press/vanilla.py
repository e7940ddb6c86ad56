"""Vanilla: keep and read every token (the reference for memory and reads)."""

from __future__ import annotations

from dms_megatron.inference.press.base import Press


class VanillaPress(Press):
    name = "vanilla"


__all__ = ["VanillaPress"]

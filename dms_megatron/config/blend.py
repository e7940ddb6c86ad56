"""Weighted dataset blends in Megatron-LM's ``--data-path`` syntax, parsed and checked before anything starts.

A blend is either a list of dataset prefixes (``[A, B]``: each sampled in proportion to its size, as Megatron-LM
does) or weights and prefixes alternating (``[0.3, A, 0.7, B]``, or the string ``"0.3 A 0.7 B"``); weights are
positive numbers, normalised by megatron-core. ``split`` is Megatron-LM's ``--split``: train / valid / test
proportions of one blend (``"98,2,0"``, or a list ``[98, 2, 0]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from dms_megatron.config.base import ConfigError

#: Megatron-LM's default ``--split``
DEFAULT_SPLIT = "969,30,1"

#: (prefixes, weights or None), the form megatron-core's GPTDatasetConfig takes
BlendSpec = Tuple[List[str], Optional[List[float]]]


def _number(tok: Any) -> Optional[float]:
    if isinstance(tok, bool):
        return None
    if isinstance(tok, (int, float)):
        return float(tok)
    try:
        return float(str(tok))
    except ValueError:
        return None


def parse_blend(field: str, value: Any) -> BlendSpec:
    """``value`` (a list, or a whitespace-separated string) -> (prefixes, weights or None); one-line ConfigError
    naming ``field`` for an odd number of entries in a weighted blend, a weight that is not a positive number, or a
    number where a prefix belongs."""
    items = value.split() if isinstance(value, str) else list(value or [])
    if not items:
        raise ConfigError(f"{field} is empty: give prefixes, or weights and prefixes ([0.3, A, 0.7, B])")
    shown = " ".join(str(x) for x in items)
    if _number(items[0]) is None:  # prefixes only
        nums = [str(x) for x in items if _number(x) is not None]
        if nums:
            raise ConfigError(f"{field}={shown!r}: {nums[0]!r} is a number among prefixes; a weighted blend starts "
                              f"with a weight: [w1, PREFIX1, w2, PREFIX2, ...]")
        return [str(x) for x in items], None
    if len(items) % 2:
        raise ConfigError(f"{field}={shown!r} has {len(items)} entries: a weighted blend alternates weight and "
                          f"prefix ([w1, PREFIX1, w2, PREFIX2, ...]), so it has an even number")
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        x = _number(w)
        if x is None or not x > 0 or x == float("inf"):
            raise ConfigError(f"{field}={shown!r}: weight {w!r} (of {p}) must be a positive number")
        if _number(p) is not None:
            raise ConfigError(f"{field}={shown!r}: {p!r} stands where a prefix belongs (weight, prefix, ...)")
        weights.append(x)
        prefixes.append(str(p))
    return prefixes, weights


def parse_split(field: str, value: Any) -> str:
    """Megatron-LM's ``--split`` ("98,2,0" or a list of up to three numbers) -> its normalised string form."""
    parts = [str(x) for x in value] if isinstance(value, (list, tuple)) else re.split(r"[,/\s:]+", str(value).strip())
    nums = [_number(p) for p in parts if p != ""]
    if not 1 <= len(nums) <= 3 or any(x is None or x < 0 for x in nums) or not sum(nums) > 0:
        raise ConfigError(f"{field}={value!r} is invalid: up to three non-negative train,valid,test proportions "
                          f"with a positive sum, e.g. 98,2,0")
    nums += [0.0] * (3 - len(nums))
    if nums[0] == 0 or nums[1] == 0:
        raise ConfigError(f"{field}={value!r}: the re-fit needs a train and a valid part (held-out evaluation), "
                          f"e.g. 98,2,0")
    return ",".join(f"{x:g}" for x in nums)


@dataclass(frozen=True)
class DataBlend:
    """Where a run's samples come from, as megatron-core's GPTDatasetConfig takes it: one ``blend`` split by
    ``split``, or a (train, valid) blend each."""

    blend: Optional[BlendSpec] = None
    split: Optional[str] = None
    train: Optional[BlendSpec] = None
    valid: Optional[BlendSpec] = None

    @classmethod
    def per_split(cls, train: str, valid: str) -> "DataBlend":
        """One dataset per split (the ``train_prefix`` / ``valid_prefix`` shorthand)."""
        return cls(train=([str(train)], None), valid=([str(valid)], None))

    def prefixes(self) -> List[str]:
        """Every dataset prefix, each once, in order."""
        specs = [self.blend] if self.blend is not None else [self.train, self.valid]
        out: List[str] = []
        for prefixes, _ in specs:
            out += [p for p in prefixes if p not in out]
        return out


__all__ = ["parse_blend", "parse_split", "DataBlend", "BlendSpec", "DEFAULT_SPLIT"]

"""What every configuration dataclass shares: the error type, one-line failures and strict construction from dicts.

Every invalid value raises ``ConfigError`` at construction time with a one-line message naming the field, the value
and what is allowed; launchers print it as ``error: ...`` and exit 2.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Iterable, Optional


#: Exit status of every command on bad input (one ``error: ...`` line on stderr, nothing written).
BAD_INPUT_EXIT_CODE = 2


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


#: How Hydra / OmegaConf writes a value the config leaves unset (a field without a default).
UNSET = "???"


class MissingValue(ConfigError):
    """Required fields (no default) that a config leaves unset; ``keys`` are their dotted names."""

    def __init__(self, keys):
        self.keys = list(keys)
        super().__init__(f"{', '.join(self.keys)} {'is' if len(self.keys) == 1 else 'are'} missing (no default: "
                         f"the config must give {'it' if len(self.keys) == 1 else 'them'})")


def fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{section}.{name}={value!r} is invalid: {allowed}")


def is_int(v: Any, lo: int = 1) -> bool:
    """True for a real int (not a bool) >= lo."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check_ints(section: str, obj: Any, names: Iterable[str], lo: int = 1) -> None:
    for name in names:
        v = getattr(obj, name)
        if not is_int(v, lo):
            fail(section, name, v, f"must be an integer >= {lo}")


def check_choice(section: str, name: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        fail(section, name, value, f"allowed values: {', '.join(allowed)}")


def from_dict(cls, data: Optional[dict], section: Optional[str] = None) -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys (typos fail loudly); nested dataclass
    fields are built recursively from their own mappings."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{section}." if section else ""
        raise ConfigError(f"unknown field(s) {[where + u for u in unknown]} for {cls.__name__}; allowed: "
                          f"{', '.join(sorted(known))}")
    for name, f in known.items():
        sub = _dataclass_type(f.type, cls)
        if sub is not None and name in data and not is_dataclass(data[name]) and data[name] != UNSET:
            data[name] = from_dict(sub, data[name], f"{section}.{name}" if section else name)
    unset = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING
             and data.get(n, UNSET) == UNSET]
    if unset:
        raise MissingValue(f"{section}.{n}" if section else n for n in unset)
    return cls(**data)


def _dataclass_type(annotation: Any, owner) -> Any:
    """The dataclass a field annotation names (annotations are strings under ``from __future__ import annotations``)."""
    if isinstance(annotation, str):
        annotation = vars(sys.modules[owner.__module__]).get(annotation)
    return annotation if isinstance(annotation, type) and is_dataclass(annotation) else None


__all__ = ["BAD_INPUT_EXIT_CODE", "ConfigError", "MissingValue", "UNSET", "fail", "is_int", "check_ints", "check_choice", "from_dict"]

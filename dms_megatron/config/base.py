"""What every configuration dataclass shares: the error type, one-line failures and strict construction from dicts.

Every invalid value raises ``ConfigError`` at construction time with a one-line message naming the field, the value
and what is allowed; launchers print it as ``error: ...`` and exit 2.
"""

from __future__ import annotations

import sys
from dataclasses import fields, is_dataclass
from typing import Any, Iterable, Optional


#: Exit status of every command on bad input (one ``error: ...`` line on stderr, nothing written).
BAD_INPUT_EXIT_CODE = 2


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


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
        if sub is not None and name in data and not is_dataclass(data[name]):
            data[name] = from_dict(sub, data[name], f"{section}.{name}" if section else name)
    return cls(**data)


def _dataclass_type(annotation: Any, owner) -> Any:
    """The dataclass a field annotation names (annotations are strings under ``from __future__ import annotations``)."""
    if isinstance(annotation, str):
        annotation = vars(sys.modules[owner.__module__]).get(annotation)
    return annotation if isinstance(annotation, type) and is_dataclass(annotation) else None


__all__ = ["BAD_INPUT_EXIT_CODE", "ConfigError", "fail", "is_int", "check_ints", "check_choice", "from_dict"]

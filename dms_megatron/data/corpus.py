"""Offline text: the Python standard library's own source files (deterministic order)."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator, List


def stdlib_files() -> List[Path]:
    """Sorted top-level and package .py files of the running interpreter's standard library (no tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if "test" not in p.parts and "site-packages" not in p.parts and "idlelib" not in p.parts
             and p.stat().st_size > 2000]
    if not files:
        raise FileNotFoundError(f"no standard-library .py files under {root}")
    return files


def stdlib_texts(max_chars: int, chunk_chars: int = 4000) -> Iterator[str]:
    """Yield text chunks (about ``chunk_chars`` each) until ``max_chars`` characters in total."""
    total = 0
    for f in stdlib_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        for i in range(0, len(text), chunk_chars):
            chunk = text[i:i + chunk_chars]
            yield chunk
            total += len(chunk)
            if total >= max_chars:
                return

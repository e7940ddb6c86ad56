"""Offline text: the Python standard library's own source files (deterministic order), split into a training part
and a held-out part by a hash of each file's path relative to the library root, so the split is the same on every
Python version and machine (file contents may differ between versions; the assignment of a file never does)."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Iterator, List

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 20  # one file in 20 is held out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """"heldout" for about one file in HELDOUT_EVERY (by a hash of its relative path), else "train"."""
    h = int(hashlib.sha1(relative_path.encode()).hexdigest()[:8], 16)
    return "heldout" if h % HELDOUT_EVERY == 0 else "train"


def stdlib_files(split: str = "train") -> List[Path]:
    """Sorted top-level and package .py files of the running interpreter's standard library (no tests) of one
    split."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    root = stdlib_root()
    files = [p for p in sorted(root.rglob("*.py"))
             if "test" not in p.parts and "site-packages" not in p.parts and "idlelib" not in p.parts
             and p.stat().st_size > 2000 and split_of(p.relative_to(root).as_posix()) == split]
    if not files:
        raise FileNotFoundError(f"no standard-library .py files of split {split!r} under {root}")
    return files


def stdlib_texts(max_chars: int, chunk_chars: int = 4000, split: str = "train") -> Iterator[str]:
    """Yield text chunks (about ``chunk_chars`` each) of one split until ``max_chars`` characters in total."""
    total = 0
    for f in stdlib_files(split):
        text = f.read_text(encoding="utf-8", errors="replace")
        for i in range(0, len(text), chunk_chars):
            chunk = text[i:i + chunk_chars]
            yield chunk
            total += len(chunk)
            if total >= max_chars:
                return


__all__ = ["stdlib_texts", "stdlib_files", "split_of", "SPLITS"]

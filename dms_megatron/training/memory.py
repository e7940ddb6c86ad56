"""Host memory of each rank (Linux): the resident set before and after the build stage and the process's peak, for
report.json's ``memory`` (the measure ``dms-dryrun``'s per-rank estimate is checked against on CPU, where parameters,
gradients, optimizer state and activations all live in host memory)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch.distributed as dist

_STATM = Path("/proc/self/statm")


def rss_bytes() -> int:
    """This process's resident set now (second field of /proc/self/statm, in pages)."""
    if not _STATM.exists():
        raise RuntimeError(f"{_STATM} is missing: the resident-set measure needs Linux")
    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (getrusage ru_maxrss; Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gather_per_rank(values: dict) -> dict:
    """{key: [value of global rank 0, 1, ...]} of every rank's ``values`` (a collective: every rank calls it)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return {k: [v] for k, v in values.items()}
    got = [None] * world
    dist.all_gather_object(got, values)
    return {k: [g[k] for g in got] for k in values}


__all__ = ["rss_bytes", "peak_rss_bytes", "gather_per_rank"]

"""Random attention inputs shared by the kernel tests: q [b, np, sq, hn], k / v [b, ng, sk, hn] and per-key
eviction log-odds z [b, ng, sk] (the last key's -inf: its decision is not made yet)."""

from __future__ import annotations

import torch


def random_qkvz(b, np_, ng, sq, sk, hn=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, np_, sq, hn, generator=gen, dtype=dtype)
    k = torch.randn(b, ng, sk, hn, generator=gen, dtype=dtype)
    v = torch.randn(b, ng, sk, hn, generator=gen, dtype=dtype)
    z = torch.randn(b, ng, sk, generator=gen, dtype=dtype) * 3
    z[..., -1] = -float("inf")
    return q, k, v, z

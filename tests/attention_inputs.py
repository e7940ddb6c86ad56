"""Shared by the kernel tests: random attention inputs (q [b, np, sq, hn], k / v [b, ng, sk, hn] and per-key
eviction log-odds z [b, ng, sk], the last key's -inf: its decision is not made yet) and ``loop_attention``, the
independent per-query reference every kernel is checked against."""

from __future__ import annotations

import math

import torch


def random_qkvz(b, np_, ng, sq, sk, hn=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, np_, sq, hn, generator=gen, dtype=dtype)
    k = torch.randn(b, ng, sk, hn, generator=gen, dtype=dtype)
    v = torch.randn(b, ng, sk, hn, generator=gen, dtype=dtype)
    z = torch.randn(b, ng, sk, generator=gen, dtype=dtype) * 3
    z[..., -1] = -float("inf")
    return q, k, v, z


def loop_attention(q, k, v, z, window, hard):
    """Independent reference: softmax over keys per (batch, head, query) with the DMS rule in the loop."""
    b, np_, sq, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    g = np_ // ng
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(np_):
            kh = h // g
            for i in range(sq):
                qpos = sk - sq + i
                scores, vals = [], []
                for kk in range(qpos + 1):
                    s = float(q[bi, h, i] @ k[bi, kh, kk]) / math.sqrt(hn)
                    if z is not None and qpos - kk > window:
                        zk = float(z[bi, kh, kk])
                        if hard:
                            if zk > 0:
                                continue
                        else:
                            s += -math.log1p(math.exp(zk)) if zk < 30 else -zk  # log(1 - sigmoid(z))
                    scores.append(s)
                    vals.append(v[bi, kh, kk])
                p = torch.softmax(torch.tensor(scores, dtype=q.dtype), 0)
                out[bi, h, i] = (p[:, None] * torch.stack(vals)).sum(0)
    return out

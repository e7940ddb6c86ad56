"""Autograd-aware all-reduces for values that are split across a tensor-parallel group.

Which backward is right depends on who consumes the reduced value:
  * ``all_reduce_sum``: rank-specific computations consume it (e.g. each rank's own heads or vocabulary shard), so
    the gradient of every rank's input is the sum of all ranks' gradients (all-reduce forward and backward);
  * ``reduce_to_replicated``: a computation every rank repeats identically consumes it (the loss), so each rank's
    input gradient is the loss gradient itself (all-reduce forward, identity backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceToReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group``; gradients summed back to every rank (for rank-specific consumers)."""
    return _AllReduceSum.apply(x, group)


def reduce_to_replicated(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group``; identity gradient (for a consumer every rank computes identically, e.g. the loss)."""
    return _ReduceToReplicated.apply(x, group)


__all__ = ["all_reduce_sum", "reduce_to_replicated"]

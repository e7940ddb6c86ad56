"""Re-fit losses under tensor / pipeline parallelism.

* ``vocab_parallel_kd_loss``: the per-token KL of ``core.losses.kd_loss`` with teacher and student logits sharded
  over the vocabulary across the tensor-parallel group (no full-vocabulary gather). Padded vocabulary entries
  (ids >= vocab_size) are excluded.
* ``vocab_parallel_argmax``: the greedy prediction from vocabulary-sharded logits (lowest global id among ties).
* Compression loss across pipeline stages: each stage adds the evicted fractions of its own layers (local KV heads)
  to a per-sample running sum that travels to the next stage inside the pipeline's activation tensor
  (``pack_stage_output`` / ``unpack_stage_input``); the last stage turns the sum into the loss. Autograd carries the
  compression gradient back through the pipeline's point-to-point sends to every stage's layers, so the one-sided
  ``max(0, target - mean fraction)`` (which couples all layers of a sample) gets exactly the gradient it has on one
  rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from dms_megatron.core.losses import masked_token_mean, token_kl
from dms_megatron.megatron.collectives import all_reduce_sum, reduce_to_replicated


def _local_log_softmax(logits: torch.Tensor, group) -> torch.Tensor:
    """log-softmax over a vocabulary sharded across ``group``. logits [..., V_local] (valid entries only)."""
    x = logits.float()
    if x.shape[-1]:
        m = x.detach().max(dim=-1, keepdim=True).values
    else:
        m = torch.full(x.shape[:-1] + (1,), float("-inf"), dtype=x.dtype, device=x.device)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sum_exp = (x - m).exp().sum(dim=-1, keepdim=True)
    sum_exp = all_reduce_sum(sum_exp, group)
    return x - m - sum_exp.log()


def vocab_parallel_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int,
                           loss_mask: Optional[torch.Tensor] = None, direction: str = "student_teacher",
                           group=None) -> torch.Tensor:
    """``core.losses.kd_loss`` on vocabulary-sharded logits.

    student_logits, teacher_logits: [..., V_local], this rank's contiguous slice of the (padded) vocabulary:
    global ids [rank * V_local, (rank + 1) * V_local) in ``group`` (megatron's tensor-parallel output layout).
    vocab_size: the real vocabulary; ids >= vocab_size are padding and excluded. loss_mask: [...] or None.
    group: the tensor-parallel group (None = megatron's). Returns the same scalar on every rank of the group,
    equal to ``kd_loss`` on the gathered, unpadded logits; gradients flow to each rank's own shard.
    """
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group)
    v_local = student_logits.shape[-1]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    n_valid = min(max(vocab_size - rank * v_local, 0), v_local)
    s = _local_log_softmax(student_logits[..., :n_valid], group)
    with torch.no_grad():
        t = _local_log_softmax(teacher_logits[..., :n_valid].detach(), group)
    tok = reduce_to_replicated(token_kl(s, t, direction), group)  # this shard's part of the sum, summed over tp
    return masked_token_mean(tok, loss_mask)


def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int, group=None) -> torch.Tensor:
    """argmax over a vocabulary sharded across ``group`` (layout as in ``vocab_parallel_kd_loss``): each rank takes
    the max of its valid shard (ids < vocab_size), the maximum value is all-reduced, and among the ranks holding it
    the lowest global id wins, so ties resolve as ``torch.argmax`` on the gathered logits does. logits [..., V_local]
    -> int64 [...] global ids, equal on every rank of the group."""
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    rank, v_local = dist.get_rank(group), logits.shape[-1]
    n_valid = min(max(vocab_size - rank * v_local, 0), v_local)
    x = logits[..., :n_valid].detach().float()
    big = torch.iinfo(torch.int64).max
    if n_valid:
        local = x.argmax(dim=-1)  # the first (lowest) id among this shard's ties
        val = x.gather(-1, local[..., None])[..., 0]
        gid = local + rank * v_local
    else:
        val = torch.full(x.shape[:-1], float("-inf"), device=x.device)
        gid = torch.full(x.shape[:-1], big, dtype=torch.int64, device=x.device)
    top = val.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    pick = torch.where(val == top, gid, torch.full_like(gid, big))
    dist.all_reduce(pick, op=dist.ReduceOp.MIN, group=group)
    return pick


# ---- compression loss across pipeline stages --------------------------------------------------------------------

def stage_fraction_sum(fractions: dict) -> torch.Tensor:
    """[b] sum over this stage's layers of the evicted fraction of this rank's KV heads (``DMSRuntime.fractions``)."""
    if not fractions:
        raise RuntimeError("no DMS layer recorded an evicted fraction on this pipeline stage")
    return torch.stack([fractions[k] for k in sorted(fractions)]).sum(0)


def pack_stage_output(hidden: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """Append the running fraction sum ``carry`` [b] to a stage's output ``hidden`` [s, B, h] as one extra batch
    column [s, 1, h] (carry in its first b entries, zeros elsewhere). Differentiable in both."""
    s, _, h = hidden.shape
    if carry.numel() > s * h:
        raise ValueError(f"micro batch {carry.numel()} larger than a pipeline message column ({s} x {h})")
    col = torch.cat([carry.to(hidden.dtype), hidden.new_zeros(s * h - carry.numel())]).view(s, 1, h)
    return torch.cat([hidden, col], dim=1)


def unpack_stage_input(x: torch.Tensor, b: int):
    """Inverse of ``pack_stage_output``: (hidden [s, B - 1, h], carry [b])."""
    return x[:, :-1], x[:, -1].reshape(-1)[:b]


def global_mean_fraction(carry_sum: torch.Tensor, num_layers: int, tp: int, group=None) -> torch.Tensor:
    """[b] evicted fraction over all layers and KV heads, from the last stage's running sum of this rank's heads.

    Every tensor-parallel rank holds the same number of KV heads, so the mean over heads is the mean over ranks.
    """
    if tp > 1:
        carry_sum = reduce_to_replicated(carry_sum, group or parallel_state.get_tensor_model_parallel_group())
    return carry_sum / (num_layers * tp)


def layer_fraction_vector(fractions: dict, num_layers: int) -> torch.Tensor:
    """float64 [num_layers]: this rank's detached batch-mean fraction per global layer (zeros for other stages)."""
    v = torch.zeros(num_layers, dtype=torch.float64)
    for layer, f in fractions.items():
        v[layer - 1] = float(f.detach().float().mean())
    return v


__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_argmax", "stage_fraction_sum", "pack_stage_output", "unpack_stage_input",
           "global_mean_fraction", "layer_fraction_vector"]

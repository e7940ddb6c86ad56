"""Process-group set-up for megatron-core (gloo on CPU, nccl on GPU), usable from torchrun or a bare process."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from dms_megatron.megatron.compat import apply_cpu_compat


#: what the layout errors call the KV heads (GQA groups)
KV_HEADS = "model.num_query_groups (KV heads)"


def free_port() -> int:
    """A TCP port on localhost nothing listens on now (a rendezvous port for local ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's RANK (0 alone)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def is_torchrun_var(name: str) -> bool:
    """A variable by which torchrun makes a process join its job (TORCHELASTIC_USE_AGENT_STORE makes
    ``init_process_group`` connect to the job's store instead of creating its own)."""
    return name in TORCHRUN_ENV or name.startswith("TORCHELASTIC_")


def single_process_env(env=None) -> dict:
    """A copy of ``env`` (default os.environ) for a process that must run alone, outside any torchrun job."""
    return {k: v for k, v in (os.environ if env is None else env).items() if not is_torchrun_var(k)}


def _check_degrees(tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel.tp={tp} and parallel.pp={pp} must be >= 1")


def _world_dp(world_size: int, tp: int, pp: int) -> int:
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp}"
        )
    return world_size // (tp * pp)


def validate_layout(world_size: int, tp: int, pp: int) -> int:
    """Check that tp * pp divides the world size; returns dp. One-line ValueError otherwise."""
    _check_degrees(tp, pp)
    return _world_dp(world_size, tp, pp)


def check_divides(value: int, what: str, div: int, knob: str) -> None:
    """The rule of a layout degree: ``knob`` = ``div`` (tp or pp) divides ``what`` = ``value`` (a model size sharded
    over it: query heads, KV heads, ffn width, layers); one-line ValueError otherwise."""
    if value % div:
        raise ValueError(f"{knob}={div} does not divide {what}={value}: choose {knob} among its divisors")


def validate_model_layout(model_cfg, tp: int, pp: int, world_size: Optional[int] = None) -> int:
    """Check that a tensor/pipeline layout fits the model (and the world size, when given) before any process group
    exists. Raises a one-line ValueError naming the numbers; returns dp (1 when ``world_size`` is None). (Sequence
    parallelism's rule on train.seq_length is RefitConfig's.)"""
    _check_degrees(tp, pp)
    for value, what, div, knob in (
        (model_cfg.num_attention_heads, "model.num_attention_heads (query heads)", tp, "parallel.tp"),
        (model_cfg.num_query_groups, KV_HEADS, tp, "parallel.tp"),
        (model_cfg.ffn_hidden_size, "model.ffn_hidden_size", tp, "parallel.tp"),
        (model_cfg.num_layers, "model.num_layers", pp, "parallel.pp"),
    ):
        check_divides(value, what, div, knob)
    return 1 if world_size is None else _world_dp(world_size, tp, pp)


def init_process_groups(tp: int = 1, pp: int = 1, *, seed: int = 1234, vpp: int | None = None,
                        timeout_s: int = 600) -> None:
    """Initialise torch.distributed and megatron's model-parallel groups.

    Uses torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT when present, otherwise a single local process.
    Safe to call again after ``destroy_process_groups()`` (tests do).
    """
    apply_cpu_compat()
    alone = "RANK" not in os.environ or "WORLD_SIZE" not in os.environ
    if dist.is_initialized():
        validate_layout(dist.get_world_size(), tp, pp)
    else:
        rank, world = (0, 1) if alone else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        validate_layout(world, tp, pp)
        if alone:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(free_port())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    destroy_model_parallel_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel_groups() -> None:
    """Tear down megatron's model-parallel groups, the process groups themselves included.

    ``parallel_state.destroy_model_parallel`` only forgets its groups: torch keeps each registered (with a gloo
    group's worker and TCP-loop threads, 51 threads per tp=pp=1 set-up), so a process that re-initialises (the
    tests' shared process, a loader after a trainer) would pile up threads that keep polling. Every group but the
    default one is destroyed here (a local operation).
    """
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        world = dist.GroupMember.WORLD
        for group in [g for g in list(dist.distributed_c10d._world.pg_map) if g is not world]:
            dist.destroy_process_group(group)


def destroy_process_groups() -> None:
    """Tear down megatron's groups and the default process group (if any)."""
    destroy_model_parallel_groups()
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["init_process_groups", "destroy_process_groups", "destroy_model_parallel_groups", "validate_layout",
           "validate_model_layout", "check_divides",
           "KV_HEADS", "single_process_env", "free_port", "rank"]

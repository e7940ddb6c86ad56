"""Megatron-style checkpoints with megatron-core dist-checkpointing (reshardable across tp/pp layouts).

Layout: ``<dir>/iter_0000100/`` (a dist-checkpointing directory: model, optimizer, common state) and
``<dir>/latest_checkpointed_iteration.txt``. Writes are atomic: the iteration is written into a temporary
directory that is renamed into place once complete, and the tracker file is replaced last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import re
import resource
import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                             get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                       FullyParallelSaveStrategyWrapper)
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException as DCPException

from dms_megatron.checkpoint.errors import CheckpointError
from dms_megatron.checkpoint.optim_state import (LAYOUT_KEY, has_moments, is_distributed, layout, load_metadata,
                                                 save_metadata)
from dms_megatron.config import DMSConfig, ModelConfig, TrainConfig, from_dict
from dms_megatron.megatron.compat import cuda_to_cpu_mode
from dms_megatron.megatron.distributed import rank
from dms_megatron.megatron.sharding import merge_swiglu_factories, spec_alias

TRACKER = "latest_checkpointed_iteration.txt"


def _unwrap(model):
    """Model chunks without their DistributedDataParallel wrapper."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m.module if hasattr(m, "module") else m for m in chunks]


def _model_sharded_sd(model) -> dict:
    chunks = _unwrap(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def iter_dir(save_dir, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


RNG_KEY = "rng_state"


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rng_object(data=None) -> ShardedObject:
    """This rank's torch RNG state as its own shard of a per-rank object (megatron keeps per-rank RNG state this
    way): in the common state every rank's differing copy would be compared with rank 0's and logged per rank."""
    return ShardedObject(RNG_KEY, torch.get_rng_state() if data is None else data, (_world(),), (rank(),),
                         replica_id=0)


def _dp_group():
    """The data-parallel group when dp > 1 (its replicas split the writes and reads of a checkpoint), else None."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if dist.get_world_size(group) > 1 else None


def _save_strategy():
    """megatron's fully parallel save at dp > 1: each data-parallel replica writes its share of the replicated
    tensors instead of dp rank 0 writing them all (None: the default strategy)."""
    group = _dp_group()
    return None if group is None else FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _use_results_queue(in_background: bool) -> None:
    """The writer's results queue: in this process for a synchronous save; for a background save a queue hosted
    by a forked multiprocessing.Manager (a plain pipe queue deadlocks: the writer process blocks flushing its
    results while the trainer joins it before reading them).

    megatron-core's FileSystemWriterAsync otherwise starts a spawned multiprocessing.Manager to host it, which
    re-imports ``__main__`` and outlives a SIGKILLed trainer (holding its stdout/stderr open).
    """
    q = getattr(filesystem_async, "_results_queue", None)
    in_process = isinstance(q, queue.Queue)
    if in_background and (q is None or in_process):
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
    elif not in_background and not in_process:  # also when none is set yet: never megatron's spawned Manager
        filesystem_async._results_queue = queue.Queue()


class AsyncSaves:
    """Checkpoint saves written in the background (megatron-core's async dist-checkpointing): ``save_checkpoint``
    returns once the tensors are staged; ``finalize`` (a collective, at a step boundary, before the next save and
    before exit) completes a finished write and only then renames it into place and moves ``latest``. A save that
    never finalizes (killed, failed) stays a temporary directory: the previous checkpoint remains ``latest``."""

    def __init__(self):
        self.queue = AsyncCallsQueue()
        self.dirs: list = []  # (save_dir, tmp) of the saves in flight, for clean-up after a failure

    def schedule(self, request, save_dir: Path, tmp: Path) -> None:
        self.dirs.append((save_dir, tmp))
        self.queue.schedule_async_request(request)

    def pending(self) -> int:
        return self.queue.get_num_unfinalized_calls()

    def finalize(self, blocking: bool = True) -> None:
        """Finalize the saves that finished on every rank (all of them when ``blocking``); one-line CheckpointError
        if a write failed (its temporary directory is removed, ``latest`` is unchanged)."""
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, DCPException) as e:  # noqa: BLE001 - a failed background write: one line, no partial
            failed = self.dirs
            self.dirs = []
            if rank() == 0:
                for _, tmp in failed:
                    shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"writing checkpoint {failed[0][1] if failed else '?'} in the background failed: "
                                  f"{_reason(e)}{write_limits(failed[0][0]) if failed else ''}") from e
        del self.dirs[:len(done)]


def _prepare(save_dir: Path, iteration: int) -> Tuple[Path, Path]:
    final, tmp = iter_dir(save_dir, iteration), save_dir / f".tmp_iter_{iteration:07d}"
    if rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    return final, tmp


def _commit(save_dir: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Rank 0 renames a complete save into place, then points the tracker at it (after every rank wrote)."""
    if rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = save_dir / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, save_dir / TRACKER)


def save_checkpoint(save_dir, iteration: int, model, optimizer=None, scheduler=None, extra: Optional[dict] = None,
                    async_saves: Optional[AsyncSaves] = None,
                    dist_optim_sharding: str = TrainConfig.dist_optim_sharding):
    """Save model (+ optimizer, scheduler, extra python state) as iteration ``iteration`` under ``save_dir``; with
    ``async_saves`` the write continues in the background and becomes ``latest`` when finalized. A distributed
    optimizer's state is written as ``dist_optim_sharding`` (``train.dist_optim_sharding``; recorded for the load)."""
    save_dir = Path(save_dir)
    if async_saves is not None:
        async_saves.finalize(blocking=True)  # one save in flight at a time
    final, tmp = _prepare(save_dir, iteration)
    state = {"model": _model_sharded_sd(model)}
    meta = None
    if optimizer is not None:
        meta = save_metadata(optimizer, dist_optim_sharding)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=meta)
    elif len(_unwrap(model)) == 1:  # weights only (conversion): no transient copy of every fc1 weight
        merge_swiglu_factories(state["model"])
    state["rng"] = _rng_object()
    common = {"iteration": iteration, "extra": extra or {}, "rng_world_size": _world(), LAYOUT_KEY: layout()}
    if scheduler is not None:
        common["scheduler"] = scheduler.state_dict()
    state["common"] = common
    _use_results_queue(in_background=async_saves is not None)
    writer_log = logging.getLogger(filesystem_async.__name__)
    level = writer_log.level
    writer_log.setLevel(logging.CRITICAL)  # its error line would repeat the one CheckpointError below
    try:
        request = dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(),
                                          async_sharded_save=async_saves is not None, content_metadata=meta)
    except (Exception, DCPException) as e:  # noqa: BLE001 - disk full, file-size limit, ...: one line, no partial
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing checkpoint {final} failed: {_reason(e)}{write_limits(save_dir)}") from e
    finally:
        writer_log.setLevel(level)
    if async_saves is not None:
        request.add_finalize_fn(lambda: _commit(save_dir, tmp, final, iteration))
        async_saves.schedule(request, save_dir, tmp)
        return final
    _barrier()
    _commit(save_dir, tmp, final, iteration)
    _barrier()
    return final


def checkpoints_dir(path) -> Path:
    """A dms-refit run dir or a megatron checkpoint dir -> the dir holding ``latest_checkpointed_iteration.txt``."""
    path = Path(path)
    if (path / "checkpoints" / TRACKER).is_file():
        return path / "checkpoints"
    return path


def latest_iteration(load_dir) -> Optional[int]:
    """The iteration recorded in the tracker file, or None if ``load_dir`` has no checkpoint."""
    p = Path(load_dir) / TRACKER
    if not p.is_file():
        return None
    text = p.read_text().strip()
    if not re.fullmatch(r"\d+", text):
        raise CheckpointError(f"{p} is corrupt: expected an iteration number, found {text[:40]!r}")
    return int(text)


def resolve_checkpoint(load_dir, iteration: Optional[int] = None) -> Tuple[Path, int]:
    """Directory and iteration to load; one-line CheckpointError if missing or partial."""
    load_dir = Path(load_dir)
    if not load_dir.exists():
        raise CheckpointError(f"checkpoint directory {load_dir} does not exist")
    if iteration is None:
        iteration = latest_iteration(load_dir)
        if iteration is None:
            raise CheckpointError(f"{load_dir} has no {TRACKER}: not a checkpoint directory (or nothing saved yet)")
    d = iter_dir(load_dir, iteration)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist (tracker or --iteration points to a missing save)")
    for needed in ("metadata.json", ".metadata", "common.pt"):
        if not (d / needed).is_file():
            raise CheckpointError(f"checkpoint {d} is partial or corrupt: {needed} is missing; "
                                  f"delete it or load an earlier iteration")
    return d, iteration


def _saved_common(d: Path) -> dict:
    """The whole common state of checkpoint ``d`` (ours under "common", megatron's content metadata beside it)."""
    try:
        return dist_checkpointing.load_common_state_dict(str(d))
    except Exception as e:  # noqa: BLE001 - report any unpickling failure as a corrupt checkpoint
        raise CheckpointError(f"checkpoint {d} is corrupt: cannot read its common state ({type(e).__name__}: {e})")


def _common(d: Path) -> dict:
    common = _saved_common(d)
    return common.get("common", common)


def read_common(load_dir, iteration: Optional[int] = None) -> dict:
    """The common (non-tensor) state saved with a checkpoint, without loading tensors."""
    d, _ = resolve_checkpoint(load_dir, iteration)
    return _common(d)


def read_extra(load_dir, iteration: Optional[int] = None) -> dict:
    """The ``extra`` dict saved with a checkpoint (configs, data position, ...), without loading tensors."""
    return read_common(load_dir, iteration).get("extra", {})


def _reason(e: BaseException) -> str:
    """One line for an exception; torch wraps a per-rank failure in a traceback dump whose last line is the
    reason."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if isinstance(e, DCPException) and lines else " ".join(lines)
    return f"{type(e).__name__}: {msg[:400]}"


def write_limits(directory: Path) -> str:
    """What may explain a failed write, for its one-line error (torch's writer reports a refused write only as
    "unexpected pos"): the process's file-size limit and the free space of ``directory``'s file system."""
    notes = []
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        notes.append(f"this process may write files of at most {soft:,} bytes (ulimit -f)")
    try:
        free = shutil.disk_usage(directory).free
        notes.append(f"{free / 2**30:.2f} GiB free on {directory}'s file system")
    except OSError:
        pass
    return f" ({'; '.join(notes)})" if notes else ""


def damaged_files(d: Path) -> List[str]:
    """Data files of a dist-checkpoint shorter than its metadata says (truncated or cut-off writes)."""
    try:
        meta = FileSystemReader(str(d)).read_metadata()
    except Exception:  # noqa: BLE001 - unreadable metadata is reported by the caller's own error
        return []
    need: dict = {}
    for item in meta.storage_data.values():
        need[item.relative_path] = max(need.get(item.relative_path, 0), item.offset + item.length)
    out = []
    for name, size in sorted(need.items()):
        p = d / name
        have = p.stat().st_size if p.is_file() else -1
        if have < size:
            out.append(f"{p} ({'missing' if have < 0 else f'{have} bytes, needs {size}'})")
    return out


def _load_strategy(d: Path):
    """megatron's fully parallel load at dp > 1: each data-parallel replica reads its share of the replicated tensors
    and the replicas exchange them (None: the default strategy, every rank reads all it needs)."""
    group = _dp_group()
    if group is None:
        return None
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(d)), group)


def _load(d: Path, state: dict, strict: bool) -> dict:
    strategy = _load_strategy(d)
    try:
        # the fully parallel exchange allocates its buffers on "cuda": on a CPU host that means CPU (compat shim)
        with cuda_to_cpu_mode() if strategy is not None else contextlib.nullcontext():
            return dist_checkpointing.load(state, str(d), sharded_strategy=strategy,
                                           strict=StrictHandling.RAISE_UNEXPECTED if strict else
                                           StrictHandling.LOG_ALL)
    except CheckpointError:
        raise
    except (Exception, DCPException) as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        damaged = damaged_files(d)
        if damaged:
            raise CheckpointError(f"cannot load {d}: data file {damaged[0]} is truncated or missing"
                                  f"{f' ({len(damaged)} such)' if len(damaged) > 1 else ''}; load an earlier "
                                  f"iteration or re-create the checkpoint") from e
        raise CheckpointError(f"cannot load {d}: {_reason(e)}") from e


def _apply_model(model, loaded_model: dict, strict: bool):
    chunks = _unwrap(model)
    if len(chunks) == 1:
        return chunks[0].load_state_dict(loaded_model, strict=strict)
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded_model[f"model{i}"], strict=strict)


def load_checkpoint(load_dir, model, optimizer=None, scheduler=None, iteration: Optional[int] = None,
                    strict: bool = True, restore_rng: bool = True) -> Tuple[int, dict]:
    """Load a full training state. Returns (iteration, extra). Each rank's torch RNG state comes back
    (``restore_rng``) when the checkpoint was saved by as many ranks; at another world size it keeps its seed."""
    d, iteration = resolve_checkpoint(load_dir, iteration)
    saved = _saved_common(d)
    common = saved.get("common", saved)
    state = {"model": _model_sharded_sd(model)}
    if optimizer is not None:
        # the optimizer state laid out as the save laid it out (megatron's content metadata)
        meta = load_metadata(d, dist_checkpointing.load_content_metadata(preloaded_state_dict=saved),
                             common.get(LAYOUT_KEY), is_distributed(optimizer))
        # A checkpoint saved before the first optimizer step holds no moments: load it into an empty state.
        has_state = has_moments(dist_checkpointing.load_tensors_metadata(str(d)))
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=has_state, metadata=meta)
    # per-rank RNG state: restored when the world size matches the save's (another layout starts from its seed)
    rng = restore_rng and common.get("rng_world_size") == _world()
    if rng:
        state["rng"] = _rng_object()
    loaded = _load(d, state, strict)
    _apply_model(model, loaded["model"], strict)
    if optimizer is not None:
        with torch.no_grad():  # megatron's dp_reshardable load copies into fp32 main params, views of the weights
            optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        if "scheduler" not in common:
            raise CheckpointError(f"checkpoint {d} has no scheduler state (saved without a scheduler)")
        scheduler.load_state_dict(common["scheduler"])
    if rng:
        torch.set_rng_state(loaded["rng"])
    elif restore_rng and "rng" in common:  # written before the RNG state was per rank: rank 0's state
        torch.set_rng_state(common["rng"])
    return iteration, common.get("extra", {})


def load_model_weights(load_dir, model, iteration: Optional[int] = None, allow_missing: Sequence[str] = ()):
    """Initialise ``model`` from a checkpoint's model weights (teacher / student init).

    Strict, except that parameters whose name contains one of ``allow_missing`` (e.g. "dms_alpha" for a DMS
    adapter student initialised from a stock checkpoint) may be absent from the checkpoint; they keep their
    initial values. Returns the list of such parameter names.
    """
    d, _ = resolve_checkpoint(load_dir, iteration)
    chunks = _unwrap(model)
    if len(chunks) != 1:
        raise NotImplementedError("load_model_weights expects a single model chunk")
    m = chunks[0]
    sharded = merge_swiglu_factories(m.sharded_state_dict())  # load fc1 in place, no merged copies
    in_ckpt = set(dist_checkpointing.load_tensors_metadata(str(d)).keys())
    skipped, absent = [], []
    for name in list(sharded):
        is_tensor = isinstance(sharded[name], ShardedTensor)
        key = getattr(sharded[name], "key", None)
        if key in in_ckpt:
            continue
        if is_tensor and spec_alias(key) in in_ckpt:  # pre-norms saved under their local names (older megatron-core)
            sharded[name] = dataclasses.replace(sharded[name], key=spec_alias(key))
            continue
        if any(a in name for a in allow_missing):
            if is_tensor:
                skipped.append(name)
            del sharded[name]
        elif is_tensor:  # extra-state objects are not in the tensor metadata; the strict load below checks them
            absent.append(key)
    absent = sorted(set(absent))
    if absent:
        raise CheckpointError(f"{d} lacks model tensors {absent[:4]}{' ...' if len(absent) > 4 else ''} "
                              f"({len(absent)} in all): wrong architecture/DMS variant, or pass allow_missing")
    loaded = _load(d, {"model": sharded}, strict=True)["model"]
    missing, unexpected = m.load_state_dict(loaded, strict=False)
    bad_missing = [k for k in missing if not any(a in k for a in allow_missing) and not k.endswith("_extra_state")]
    if bad_missing or unexpected:
        raise CheckpointError(f"{d} does not match the model: missing {bad_missing[:5]}, unexpected {unexpected[:5]}")
    return skipped


def read_checkpoint_configs(load_dir, iteration: Optional[int] = None) -> Tuple[ModelConfig, Optional[DMSConfig],
                                                                              dict]:
    """(architecture, DMS settings or None for a plain model, the whole extra dict) recorded with a checkpoint."""
    extra = read_extra(load_dir, iteration)
    if "model_config" not in extra:
        raise CheckpointError(f"{load_dir}: checkpoint does not record extra['model_config'] (not written by "
                              f"dms-convert import or dms-refit)")
    mc = from_dict(ModelConfig, extra["model_config"], "model")
    dms = from_dict(DMSConfig, extra["dms_config"], "dms") if extra.get("dms_config") else None
    return mc, dms, extra


__all__ = ["AsyncSaves", "save_checkpoint", "load_checkpoint", "load_model_weights", "latest_iteration",
           "resolve_checkpoint", "read_common", "read_extra", "read_checkpoint_configs", "CheckpointError", "iter_dir",
           "TRACKER", "checkpoints_dir"]

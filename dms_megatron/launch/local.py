"""Start the ranks of a one-node job as plain local processes (what ``dms-refit`` does for several ranks).

Each rank is ``python -m dms_megatron.launch.worker --run-dir RUN`` with RANK / LOCAL_RANK / WORLD_SIZE /
LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun or srun would. Unlike torchrun, this keeps the
workers' own exit status (4 = preempted, 2 = bad input) and lets every rank see Ctrl-C itself: the ranks share the
launcher's terminal process group, so one Ctrl-C reaches all of them at once and each checkpoints at the same step
boundary; the launcher only waits. If a rank fails, the others are terminated (SIGTERM, then SIGKILL) and the first
failure's status is returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from dms_megatron.megatron.distributed import free_port, single_process_env
from dms_megatron.training.preemption import ABORTED_EXIT_CODE, PREEMPTED_EXIT_CODE

GRACE_S = 30.0


def rank_env(rank: int, world: int, port: int, base: Optional[dict] = None) -> dict:
    env = single_process_env(base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_local_ranks(run_dir: Path, world: int) -> int:
    """Run ``world`` worker ranks on this machine until all finish; returns the job's exit status."""
    port = free_port()
    cmd = [sys.executable, "-m", "dms_megatron.launch.worker", "--run-dir", str(run_dir)]
    procs: List[subprocess.Popen] = [subprocess.Popen(cmd, env=rank_env(r, world, port)) for r in range(world)]
    previous = signal.signal(signal.SIGINT, lambda *a: None)  # the ranks handle Ctrl-C; the launcher waits
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                # a preempted or aborted job: every rank stops by itself; a real failure: stop the others
                if any(c not in (PREEMPTED_EXIT_CODE, ABORTED_EXIT_CODE) for c in failed):
                    _stop(procs)
                else:
                    for p in procs:
                        p.wait()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, previous)
        if any(p.poll() is None for p in procs):
            _stop(procs)


__all__ = ["run_local_ranks", "rank_env"]

"""Start the ranks of a one-node job as plain local processes (what ``dms-refit`` does for several ranks).

Each rank is ``python -m dms_megatron.launch.worker --run-dir RUN`` with RANK / LOCAL_RANK / WORLD_SIZE /
LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as torchrun or srun would. Unlike torchrun, this keeps the
workers' own exit status (4 = preempted, 2 = bad input). The ranks run in a process group of their own and the
launcher forwards every stop signal it receives (SIGINT from Ctrl-C or ``kill -INT``, SIGTERM from a scheduler or
``kill``, SIGUSR1) to each of them exactly once, so they all checkpoint at the same step boundary and a second
Ctrl-C aborts them; a rank whose launcher dies gets SIGTERM (Linux parent-death signal) and checkpoints too. If a
rank fails, the others are terminated (SIGTERM, then SIGKILL) and the first failure's status is returned.
"""

from __future__ import annotations

import ctypes
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


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _rank_preexec() -> None:
    """In the child before exec: a process group of its own (a terminal's Ctrl-C then reaches the launcher only,
    which forwards it once), and SIGTERM when the launcher dies (PR_SET_PDEATHSIG; Linux only)."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_local_ranks(run_dir: Path, world: int, inputs: Optional[Path] = None) -> int:
    """Run ``world`` worker ranks on this machine until all finish (each given the pre-flight record ``inputs``,
    when there is one); returns the job's exit status."""
    port = free_port()
    cmd = [sys.executable, "-m", "dms_megatron.launch.worker", "--run-dir", str(run_dir)]
    cmd += ["--inputs", str(inputs)] if inputs is not None else []
    procs: List[subprocess.Popen] = [subprocess.Popen(cmd, env=rank_env(r, world, port), preexec_fn=_rank_preexec)
                                     for r in range(world)]

    def forward(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
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
        for s, h in previous.items():
            signal.signal(s, h)
        if any(p.poll() is None for p in procs):
            _stop(procs)


__all__ = ["run_local_ranks", "rank_env"]

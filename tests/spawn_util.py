"""Run a function in a few spawned gloo processes and collect the (key, value) pair each one reports; run the
parallel re-fit harness under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HARNESS = HERE / "parallel_harness.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_collect(target, world: int, timeout: float) -> dict:
    """Start ``target(rank, world, port, queue)`` in ``world`` spawned processes (a fresh TCP port for their process
    group); each puts one (key, value) pair on the queue. Returns {key: value}; every process must exit 0."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"rank {procs.index(p)} exited with {p.exitcode}"
    return got


def torchrun_harness(nproc: int, d: dict, tmp: Path, *args, timeout: float = 900) -> None:
    """``tests/parallel_harness.py`` on ``nproc`` local ranks under torchrun with the refit config dict ``d``
    (written under ``tmp``) and the harness's ``args``; every rank must exit 0."""
    cfg_path = tmp / f"config-{os.getpid()}-{len(list(tmp.iterdir()))}.json"
    cfg_path.write_text(json.dumps(d))
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(HARNESS), "--config", str(cfg_path), *map(str, args)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: ...{r.stdout[-1500:]}\nstderr: ...{r.stderr[-3000:]}"

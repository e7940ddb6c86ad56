"""Run a function in a few spawned gloo processes and collect the (key, value) pair each one reports."""

from __future__ import annotations

import socket


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

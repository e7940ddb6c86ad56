"""How long a checkpoint save stalls training, synchronous vs background (``train.async_save=true``), measured in
one run at tp=2 x pp=2 on CPU (4 gloo ranks); read the ratio.

  python benchmarks/checkpoint_stall.py [--steps 12] [--save-interval 3] [--reps 1]

The embedded tiny re-fit (model + Adam state checkpointed every ``--save-interval`` steps) runs once per mode and
rep, alternating modes. The stall of a save is the wall time the trainer spends inside its save calls: the whole
write when synchronous; staging the tensors, scheduling the writer process and the later finalize (metadata,
rename, ``latest``) when in the background. Printed per mode: median stall per save, median step time, and the
async / sync stall ratio of each rep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker(out: Path, run_dir: Path, mode: str, steps: int, interval: int) -> None:
    import torch.distributed as dist

    from dms_megatron.config import TINY_TEACHER, RefitConfig
    from dms_megatron.training.run_config import write_run_config
    from dms_megatron.training.trainer import RefitTrainer, TrainerHooks

    cfg = RefitConfig.from_dict({"model": TINY_TEACHER, "parallel": {"tp": 2, "pp": 2}, "logging": {"wandb": False, "progress": False},
                                 "train": {"steps": steps, "save_interval": interval, "eval_interval": 0,
                                           "async_save": mode == "async"}})
    stalls, stamps, depth = [], [], [0]

    def timed(fn):  # the outermost save call only (a save first finalizes the one before it)
        def call(*a, **k):
            t0 = time.perf_counter()
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    stalls.append(time.perf_counter() - t0)
        return call

    write_run_config(run_dir, cfg)
    trainer = RefitTrainer(cfg, run_dir, TrainerHooks(after_step=lambda s, m: stamps.append(time.perf_counter())))
    trainer.checkpoint = timed(trainer.checkpoint)
    if trainer.async_saves is not None:
        trainer.async_saves.finalize = timed(trainer.async_saves.finalize)
    trainer.run(report=False)
    if dist.get_rank() == 0:
        steps_s = [b - a for a, b in zip(stamps, stamps[1:])]
        out.write_text(json.dumps({"saves": steps // interval, "stall": sum(stalls), "steps": steps_s}))


def _run(mode: str, steps: int, interval: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = dict(os.environ, WANDB_MODE="disabled")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                        __file__, "--worker", str(out), str(Path(tmp) / "run"), mode, str(steps), str(interval)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-interval", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        out, run_dir, mode, steps, interval = args.worker
        _worker(Path(out), Path(run_dir), mode, int(steps), int(interval))
        return
    for rep in range(args.reps):
        got = {m: _run(m, args.steps, args.save_interval) for m in ("sync", "async")}
        per = {m: g["stall"] / g["saves"] for m, g in got.items()}
        for m, g in got.items():
            print(f"rep {rep}: {m:5s} stall per save {per[m] * 1000:7.0f} ms ({g['saves']} saves) | median step "
                  f"{statistics.median(g['steps']) * 1000:.0f} ms")
        print(f"rep {rep}: async / sync stall per save = {per['async'] / per['sync']:.2f}")


if __name__ == "__main__":
    main()

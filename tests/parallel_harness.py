"""One rank of a re-fit for the parallel-equivalence tests, with the student's reduced gradients of every step saved
as a dist checkpoint (so a one-rank process can load them resharded to tp = pp = 1).

  torchrun --nproc-per-node N tests/parallel_harness.py --config CFG.json --run-dir DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def grads_dir(run_dir) -> Path:
    return Path(run_dir) / "grads"


def dump_grads(run_dir):
    """An ``after_backward`` hook: save the student's gradients (megatron DDP's main_grad) at the student's own
    checkpoint keys, as iteration step + 1 under run_dir/grads."""
    from dms_megatron.training.checkpointing import save_checkpoint

    def hook(step, ddp):
        student = ddp.module.student
        swapped = []
        for p in student.parameters():
            if p.requires_grad:
                swapped.append((p, p.data))
                p.data = p.main_grad.detach().view_as(p).clone()
        try:
            save_checkpoint(grads_dir(run_dir), step + 1, student)
        finally:
            for p, data in swapped:
                p.data = data

    return hook


def main(argv=None) -> int:
    from dms_megatron.training.config import RefitConfig
    from dms_megatron.training.loop import run_refit

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    cfg = RefitConfig.from_dict(json.loads(args.config.read_text()))
    run_refit(cfg, args.run_dir, report=False, after_backward=dump_grads(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

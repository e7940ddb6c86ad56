#!/usr/bin/env python
"""Pre-train the embedded tiny teacher and write the assets the package ships (seeded and reproducible per device).

  python tools/build_tiny_teacher.py                       # into dms_megatron/assets/tiny_teacher[.sha256] (hours)
  python tools/build_tiny_teacher.py --device cuda         # minutes on a GPU
  python tools/build_tiny_teacher.py --out /tmp/t --steps 50   # a quick smoke build elsewhere
  python tools/build_tiny_teacher.py --progress teacher.progress.pt   # resumable: run the same line again after a stop

The recipe is ``dms_megatron.training.pretrain.PretrainRecipe``; the build record (recipe, recall on held-out items
every 250 steps, versions) lands in ``build.json`` beside the weights. Ctrl-C / SIGTERM: the partial build is removed
and the previous assets stay; with ``--progress FILE`` the pre-training state of the last evaluation (every 250
steps) stays in FILE and the same command resumes from it, to the same weights bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

import torch

from dms_megatron.data.embedded import TEACHER_DIR
from dms_megatron.training.pretrain import PretrainRecipe, ProgressMismatch
from dms_megatron.training.teacher_build import build_teacher_assets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TEACHER_DIR,
                    help=f"teacher directory; its checksums go to <out>.sha256 (default {TEACHER_DIR})")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's steps (smoke builds)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--progress", type=Path, default=None,
                    help="save the pre-training state here every 250 steps and resume from it (default: no resume)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = PretrainRecipe()
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    try:
        record = build_teacher_assets(args.out, recipe, device, log=lambda m: print(f"[teacher] {m}", flush=True),
                                      progress=args.progress)
    except KeyboardInterrupt:
        kept = (f"; progress kept in {args.progress} (run the same command to resume)"
                if args.progress is not None and args.progress.is_file() else "")
        print(f"[teacher] interrupted: nothing written to {args.out}{kept}", file=sys.stderr)
        return 130
    except ProgressMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[teacher] wrote {args.out}: {record['final']} in {record['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

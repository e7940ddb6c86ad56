"""One rank of a re-fit, reading the launcher's resolved ``config.yaml`` (no Hydra here).

  python -m dms_megatron.launch.worker --run-dir DIR                 (one process)
  torchrun --nproc-per-node N -m dms_megatron.launch.worker --run-dir DIR
  srun (one task per rank: RANK/WORLD_SIZE/LOCAL_RANK from SLURM, see slurm/refit.sbatch)

Exit status: see ``dms_megatron.training.entry`` (0 finished, 2 bad input, 3 diverged, 4 preempted, 130 aborted).
Every rank runs the end-of-run report stage at the training layout; rank 0 writes report.json. Running a finished
run dir again (at any layout) writes its report again. ``--inputs DIR/inputs.json`` hands a rank the launcher's
pre-flight (dms-refit passes it to its local ranks); without it each rank runs the pre-flight itself.
``--inject-fault kill@N|nan@N`` is a test hook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dms_megatron.training.entry import run_rank


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--inputs", default=None, type=Path, help="the launcher's pre-flight record (dms-refit's local "
                    "ranks: DIR/inputs.json); without it this rank runs the pre-flight")
    ap.add_argument("--inject-fault", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return run_rank(args.run_dir, fault=args.inject_fault, inputs=args.inputs)


if __name__ == "__main__":
    sys.exit(main())

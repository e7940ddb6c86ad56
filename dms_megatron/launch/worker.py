"""One rank of a re-fit, reading the launcher's resolved ``config.yaml`` (no Hydra here).

  python -m dms_megatron.launch.worker --run-dir DIR                 (one process)
  torchrun --nproc-per-node N -m dms_megatron.launch.worker --run-dir DIR
  srun (one task per rank: RANK/WORLD_SIZE/LOCAL_RANK from SLURM, see slurm/refit.sbatch)

Exit status: see ``dms_megatron.training.entry`` (0 finished, 2 bad input, 3 diverged, 4 preempted, 130 aborted).
Rank 0 of a finished tensor/pipeline-parallel run then evaluates the final checkpoint in a fresh one-rank process
(``python -m dms_megatron.launch.report``). ``--inject-fault kill@N|nan@N`` is a test hook.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from dms_megatron.megatron.distributed import single_process_env
from dms_megatron.training.entry import needs_report_process, read_run_config, run_rank


def report_in_fresh_process(run_dir: Path) -> int:
    rc = subprocess.call([sys.executable, "-m", "dms_megatron.launch.report", "--run-dir", str(run_dir)],
                         env=single_process_env())
    if rc:
        print(f"error: the end-of-run evaluation of {run_dir} failed (exit {rc}); rerun it with: python -m "
              f"dms_megatron.launch.report --run-dir {run_dir}", file=sys.stderr)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--inject-fault", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rc = run_rank(args.run_dir, fault=args.inject_fault)
    if rc == 0 and os.environ.get("RANK", "0") == "0" and needs_report_process(read_run_config(args.run_dir)):
        rc = report_in_fresh_process(args.run_dir)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Worker entry point: one rank of a re-fit, reading the launcher's resolved ``config.yaml`` (no Hydra here).

  python -m dms_megatron.training.worker --run-dir DIR          (single process)
  torchrun --nproc-per-node N -m dms_megatron.training.worker --run-dir DIR
  srun (one task per rank: RANK/WORLD_SIZE/LOCAL_RANK from SLURM, see slurm/refit.sbatch)

Exit status: 0 finished (report.json written), 2 configuration/input error (one "error: ..." line on stderr),
3 diverged (NaN/inf loss), 4 preempted (SIGUSR1/SIGTERM: checkpoint saved, run again to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dms_megatron.config import ConfigError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    from dms_megatron.training.preemption import catch_early_usr1

    catch_early_usr1()  # a SLURM warning signal during start-up must not kill the rank
    from dms_megatron.training.checkpointing import CheckpointError
    from dms_megatron.training.config import RefitConfig
    from dms_megatron.training.loop import TrainingDiverged, run_refit
    from dms_megatron.training.preemption import PREEMPTED_EXIT_CODE, Preempted

    cfg_path = args.run_dir / "config.yaml"
    if not cfg_path.is_file():
        print(f"error: {cfg_path} does not exist (the launcher writes it)", file=sys.stderr)
        return 2
    try:
        cfg = RefitConfig.from_dict(yaml.safe_load(cfg_path.read_text()))
        report = run_refit(cfg, args.run_dir)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:  # stop signal: checkpoint saved, not finished; the batch script requeues
        print(str(e), flush=True)
        return PREEMPTED_EXIT_CODE
    if report:
        print("report: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in report.items() if not isinstance(v, dict)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

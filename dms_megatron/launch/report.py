"""The end-of-run report of a re-fit from its run dir, evaluated on one rank (tp = pp = 1, resharded checkpoint).

  python -m dms_megatron.launch.report --run-dir DIR       (reads DIR/config.yaml and DIR/checkpoints)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dms_megatron.checkpoint import CheckpointError
from dms_megatron.config import BAD_INPUT_EXIT_CODE, ConfigError
from dms_megatron.training.report import format_report, report_from_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        report = report_from_checkpoint(args.run_dir)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``dms-refit``: the Hydra launcher of a DMS re-fit.

Before anything starts, the overrides are composed and validated (``hydra_cli.preflight``: unknown keys, wrong types
and unknown presets are one ``error:`` line with "did you mean", exit 2), the run's inputs are resolved and checked
once (``training.preflight``: teacher, data, tokenizer, sequence length, layout, batch sizes) and a resumed run dir's
config.yaml is compared with the new settings (``training.run_config``). Then Hydra makes the run dir
(``hydra.run.dir=DIR`` to choose it; ``-m`` for sweeps), ``config.yaml`` is written and the ranks run with the
pre-flight's result: in this process for one rank, as local worker processes for several (``parallel.nproc_per_node``
or tp * pp; e.g. ``dms-refit parallel.tp=2 parallel.pp=2`` starts 4), which read it from ``inputs.json``.

``dms-refit --prepare-only hydra.run.dir=DIR ...`` runs every check and writes ``DIR/config.yaml`` without training
(exit 2 with the one-line error on bad input): batch jobs (slurm/refit.sbatch) launch the ranks themselves.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Tuple

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from dms_megatron.config import ConfigError, RefitConfig
from dms_megatron.launch.hydra_cli import fail, run_hydra
from dms_megatron.launch.local import run_local_ranks
from dms_megatron.progress import StopRequested
from dms_megatron.training.entry import run_rank
from dms_megatron.training.inputs import refit_config
from dms_megatron.training.preflight import INPUTS, Checked, preflight, save_checked
from dms_megatron.training.preemption import ABORTED_EXIT_CODE
from dms_megatron.training.run_config import check_resume, write_run_config

PREPARE_ONLY_FLAG = "--prepare-only"
_prepare_only = False
_checked: Optional[Tuple[dict, Checked]] = None  # (composed config, its pre-flight) of the point checked before Hydra


def check_run(cfg: RefitConfig, run_dir: Optional[Path]) -> Checked:
    """Every check that needs no process group, once: the pre-flight (inputs: teacher, tokenizer, data, the
    teacher's architecture is the configured one; the layout) and, for a given ``run_dir``, resume compatibility."""
    checked = preflight(cfg)
    if run_dir is not None:
        check_resume(run_dir, cfg)
    return checked


def given_run_dir(argv) -> Optional[Path]:
    """The run dir of a single run when the command line names it (``hydra.run.dir=DIR``); None for a sweep or a
    new timestamped dir (which holds no earlier run)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    return Path(dirs[-1]) if dirs else None


def preflight_check(d: dict) -> RefitConfig:
    """``check_run`` on the composed command line (a sweep's first point), before Hydra makes the run dir or writes
    into it: a bad input or a refused resume leaves nothing on disk (no ``.hydra/``, no log). The job that runs this
    point takes the result over."""
    global _checked
    cfg = refit_config(d)
    _checked = (d, check_run(cfg, given_run_dir(sys.argv[1:])))
    return cfg


def job_checked(d: dict) -> Checked:
    """The pre-flight of the job whose composed config is ``d``: ``preflight_check``'s when it checked this point
    (a single run, a sweep's first job), else this job's own (another sweep point; a job in a process of its own)."""
    if _checked is not None and _checked[0] == d:
        return _checked[1]
    return check_run(refit_config(d), None)  # a new job dir: Hydra made it, no earlier run in it


def _task(dcfg) -> None:
    try:
        _run(dcfg)
    except KeyboardInterrupt:  # Ctrl-C while the launcher itself works (checks, the embedded data build)
        print("aborted by Ctrl-C before training started: nothing was written but the run config", file=sys.stderr)
        sys.exit(ABORTED_EXIT_CODE)
    except StopRequested as e:  # SIGTERM during the embedded data build (its partial output is removed)
        print(f"{e} before training started: nothing was written but the run config", file=sys.stderr)
        sys.exit(e.exit_code)


def _run(dcfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        checked = job_checked(OmegaConf.to_container(dcfg, resolve=True))
        for key, old, new in write_run_config(run_dir, checked.cfg):
            print(f"resume: {key} {old!r} -> {new!r} (allowed by resume.allow_changes)", flush=True)
    except ConfigError as e:
        fail(str(e))
    if _prepare_only:
        print(f"config: {run_dir / 'config.yaml'}", flush=True)
        return
    p = checked.cfg.parallel
    if "RANK" in os.environ and p.world_size > 1:
        fail(f"dms-refit runs in one process per job, not per rank (RANK is set, parallel asks for {p.world_size} "
             f"ranks): start the ranks with `launch/torchrun.sh {run_dir}` or `python -m dms_megatron.launch.worker "
             f"--run-dir {run_dir}` per rank")
    if p.nnodes > 1:
        fail(f"parallel.nnodes={p.nnodes}: dms-refit starts ranks on this machine only; start `launch/torchrun.sh "
             f"{run_dir}` on every node (its config.yaml is written), or check the layout with dms-dryrun")
    try:
        checked = checked.built()  # the embedded data, built once here, not in every rank
    except ConfigError as e:
        fail(str(e))
    world = p.ranks_per_node
    if world > 1:
        rc = run_local_ranks(run_dir, world, inputs=save_checked(checked, run_dir / INPUTS))
    else:
        rc = run_rank(run_dir, checked=checked)
    if rc:
        sys.exit(rc)


def main() -> None:
    global _prepare_only
    if PREPARE_ONLY_FLAG in sys.argv[1:]:
        sys.argv.remove(PREPARE_ONLY_FLAG)
        _prepare_only = True
    os.environ.setdefault("WANDB_MODE", "offline")
    run_hydra("refit", RefitConfig, preflight_check, _task)


if __name__ == "__main__":
    main()

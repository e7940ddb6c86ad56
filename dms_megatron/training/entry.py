"""One rank of a re-fit from its run dir, as an exit status (what the worker and the launcher run).

Exit status: 0 finished (report.json written by rank 0 after the report stage, which every rank runs at the
training layout), 2 configuration/input error (one ``error: ...`` line on stderr), 3 diverged (NaN/inf loss), 4 preempted
(SIGUSR1/SIGTERM/SIGINT: checkpoint saved, run again to resume), 130 aborted by a second Ctrl-C.

Fault injection for resilience tests is explicit: ``run_rank(..., fault="kill@N")`` SIGKILLs this process after
step N is logged, ``"nan@N"`` makes step N's loss NaN (the worker's ``--inject-fault``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist
import yaml

from dms_megatron.checkpoint import CheckpointError
from dms_megatron.config import BAD_INPUT_EXIT_CODE, ConfigError, RefitConfig
from dms_megatron.data.embedded import AssetError
from dms_megatron.training.preflight import Checked, load_checked
from dms_megatron.training.preemption import ABORTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted, catch_early_usr1
from dms_megatron.training.report import format_report
from dms_megatron.training.run_config import CONFIG
from dms_megatron.megatron.distributed import destroy_process_groups, rank
from dms_megatron.progress import StopRequested
from dms_megatron.training.trainer import RefitTrainer, TrainerHooks, TrainingDiverged

DIVERGED_EXIT_CODE = 3


def fault_hooks(spec: Optional[str]) -> TrainerHooks:
    """Hooks for "kill@N" (SIGKILL after step N is logged) or "nan@N" (step N's loss is NaN)."""
    if not spec:
        return TrainerHooks()
    kind, _, at = spec.partition("@")
    if kind not in ("kill", "nan") or not at.isdigit():
        raise ConfigError(f"--inject-fault {spec!r}: expected kill@STEP or nan@STEP")
    n = int(at)
    if kind == "kill":
        return TrainerHooks(after_step=lambda step, m: os.kill(os.getpid(), signal.SIGKILL) if step == n else None)
    return TrainerHooks(loss=lambda step, loss: loss * float("nan") if step == n else loss)


def read_run_config(run_dir: Path) -> RefitConfig:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (dms-refit or dms-refit --prepare-only writes it)")
    return RefitConfig.from_dict(yaml.safe_load(path.read_text()))


def run_rank(run_dir: Path, fault: Optional[str] = None, checked: Optional[Checked] = None,
             inputs: Optional[Path] = None) -> int:
    """Train this rank of the run in ``run_dir``; never raises for the failures the exit status names. The
    launcher's pre-flight comes as ``checked`` (in-process) or as the record ``inputs`` (``training.preflight``);
    without either the trainer runs it.

    The process groups this call creates are destroyed before it returns when every rank ends the same way (finished,
    diverged, preempted: each is decided collectively): torch requires ``destroy_process_group`` before a normal exit,
    and a gloo rank that leaves it to interpreter shutdown can abort there ("terminate called without an active
    exception", exit -6 instead of 0 or 4). After a failure of this rank alone the groups are left as they are: a
    peer may be inside a collective, where tearing down can hang (NCCL)."""
    owned = not dist.is_initialized()
    code = _run_rank(run_dir, fault, checked, inputs)
    shared = code in (0, DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE)
    if owned and dist.is_initialized() and (shared or dist.get_world_size() == 1):
        destroy_process_groups()
    return code


def _run_rank(run_dir: Path, fault: Optional[str], checked: Optional[Checked], inputs: Optional[Path]) -> int:
    catch_early_usr1()  # a SLURM warning signal during start-up must not kill the rank
    try:
        cfg = checked.cfg if checked is not None else read_run_config(run_dir)
        if inputs is not None:
            checked = load_checked(inputs, cfg)
        report = RefitTrainer(cfg, run_dir, fault_hooks(fault), checked=checked).run()
    except (ConfigError, CheckpointError, AssetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    except Preempted as e:  # stop signal: checkpoint saved, not finished; a batch script requeues
        print(str(e), flush=True)
        return PREEMPTED_EXIT_CODE
    except StopRequested as e:  # SIGTERM while the embedded data was built (removed again)
        print(f"{e} before training started: nothing was written but the run config", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it
        if rank() == 0:
            print(f"aborted by Ctrl-C: the last saved checkpoint in {Path(run_dir) / 'checkpoints'} (if any) stays; "
                  f"run again with the same run dir to resume", file=sys.stderr)
        return ABORTED_EXIT_CODE
    if report:
        print(format_report(report), flush=True)
    return 0


__all__ = ["run_rank", "fault_hooks", "read_run_config", "DIVERGED_EXIT_CODE"]

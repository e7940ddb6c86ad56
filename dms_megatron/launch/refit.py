"""``dms-refit``: the Hydra launcher of a DMS re-fit.

Hydra resolves configs/refit.yaml + overrides (e.g. ``dms.final_cr=8 dms.window=256``, ``-m`` for sweeps) into a run
directory (``hydra.run.dir=DIR`` to choose it), validates them into a ``RefitConfig`` (a bad value stops here with a
one-line error), writes ``config.yaml`` and runs the worker: in-process for one rank, or through torchrun when the
layout needs several (``parallel.nproc_per_node`` or tp * pp ranks; e.g. ``dms-refit parallel.tp=2 parallel.pp=2``
starts 4). A layout that does not fit the model or the world size fails here, before any rank starts.

``dms-refit --prepare-only hydra.run.dir=DIR ...`` validates and writes ``DIR/config.yaml`` without training (exit 2
with the one-line error on a bad config): batch jobs (slurm/refit.sbatch) launch the ranks themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PREPARE_ONLY_FLAG = "--prepare-only"
_prepare_only = False


def register_configs() -> None:
    """Register the structured schema so YAML groups are type-checked (unknown keys and wrong types fail)."""
    from hydra.core.config_store import ConfigStore

    from dms_megatron.training.config import RefitConfig

    ConfigStore.instance().store(name="refit_schema", node=RefitConfig)


def _task(dcfg) -> None:
    import yaml
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dms_megatron.config import ConfigError
    from dms_megatron.training.config import RefitConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    container = OmegaConf.to_container(dcfg, resolve=True)
    try:
        cfg = RefitConfig.from_dict(container)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from dms_megatron.megatron.distributed import validate_model_layout

    p = cfg.parallel
    world = p.nproc_per_node or p.tp * p.pp
    try:  # before any rank starts (the model of an embedded or imported teacher is checked again by each worker)
        validate_model_layout(cfg.model, p.tp, p.pp, p.world_size, sequence_parallel=p.sequence_parallel,
                              seq_length=cfg.train.seq_length)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if _prepare_only:
        print(f"config: {run_dir / 'config.yaml'}", flush=True)
        return
    if p.nnodes > 1 and "RANK" not in os.environ:
        print(f"error: parallel.nnodes={p.nnodes}: dms-refit starts ranks on this machine only; start "
              f"`torchrun --nnodes {p.nnodes} --nproc-per-node {world} -m dms_megatron.training.worker --run-dir "
              f"{run_dir}` on every node (its config.yaml is written), or check the layout with dms-dryrun",
              file=sys.stderr)
        sys.exit(2)
    if world > 1 and "RANK" not in os.environ:
        if cfg.embedded:  # build (or find) the embedded teacher once here, not in every rank
            from dms_megatron.data.embedded import ensure_tiny_teacher

            ensure_tiny_teacher()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "dms_megatron.training.worker", "--run-dir", str(run_dir)]
        rc = subprocess.call(cmd)
    else:
        from dms_megatron.training.worker import main as worker_main

        rc = worker_main(["--run-dir", str(run_dir)])
    if rc:
        sys.exit(rc)


def main() -> None:
    import hydra

    if not CONFIG_DIR.is_dir():
        print(f"error: config directory {CONFIG_DIR} not found; install the project editable (pip install -e .) "
              f"from its source checkout", file=sys.stderr)
        sys.exit(2)
    global _prepare_only
    if PREPARE_ONLY_FLAG in sys.argv[1:]:
        sys.argv.remove(PREPARE_ONLY_FLAG)
        _prepare_only = True
    os.environ.setdefault("WANDB_MODE", "offline")
    register_configs()
    hydra.main(config_path=str(CONFIG_DIR), config_name="refit", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()

"""``dms-eval``: the Hydra launcher of the evaluation harness (configs/eval.yaml; run dir ``hydra.run.dir=DIR``).

With no arguments it evaluates the embedded default: the shipped tiny teacher, its students re-fitted to CR 2, 4
and 8 (re-fitted once, then reused from the cache dir) and the baselines at DMS-matched budgets, writing
``eval.json`` and ``pareto_*.png`` into the run dir, with a progress line per method and CR.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from dms_megatron.checkpoint import CheckpointError
from dms_megatron.config import ConfigError
from dms_megatron.data.embedded import AssetError
from dms_megatron.eval.config import EvalConfig
from dms_megatron.eval.run import StudentRefitError, run_eval
from dms_megatron.inference.model import ModelLoadError
from dms_megatron.launch.hydra_cli import fail, run_hydra

PROG = "dms-eval"


def _task(dcfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = EvalConfig.from_dict(OmegaConf.to_container(dcfg, resolve=True))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run_eval(cfg, run_dir, log=lambda m: print(f"[{PROG}] {m}", flush=True))
    except (ConfigError, ModelLoadError, CheckpointError, AssetError, FileNotFoundError) as e:
        fail(str(e))
    except StudentRefitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    run_hydra("eval", EvalConfig, EvalConfig.from_dict, _task)


if __name__ == "__main__":
    main()

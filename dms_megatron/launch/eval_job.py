"""What the evaluation launchers (dms-eval, dms-hyperscale) share: the Hydra task that validates the composed
config, records it as the run dir's ``config.yaml``, runs the evaluation with a prefixed progress log, and turns
bad input into one ``error:`` line (exit 2) and a stopped student re-fit into its own exit status."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from dms_megatron.checkpoint import CheckpointError
from dms_megatron.config import ConfigError
from dms_megatron.data.embedded import AssetError
from dms_megatron.eval.run import StudentRefitError
from dms_megatron.inference.model import ModelLoadError
from dms_megatron.launch.hydra_cli import fail, run_hydra


def eval_main(prog: str, config_name: str, schema, run: Callable) -> None:
    """The launcher's main: ``run(cfg, run_dir, log=...)`` on the validated ``schema`` config (``schema.from_dict``)
    of Hydra config ``config_name``."""

    def task(dcfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            cfg = schema.from_dict(OmegaConf.to_container(dcfg, resolve=True))
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            run(cfg, run_dir, log=lambda m: print(f"[{prog}] {m}", flush=True))
        except (ConfigError, ModelLoadError, CheckpointError, AssetError, FileNotFoundError) as e:
            fail(str(e))
        except StudentRefitError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.code)

    os.environ.setdefault("WANDB_MODE", "offline")
    run_hydra(config_name, schema, schema.from_dict, task)


__all__ = ["eval_main"]

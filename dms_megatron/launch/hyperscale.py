"""``dms-hyperscale``: inference-time hyper-scaling measured (configs/hyperscale.yaml; run dir
``hydra.run.dir=DIR``).

With no arguments: the embedded tiny teacher's held-out chained-recall questions, answered by W sampled chains of at
most L tokens (majority vote) for the vanilla teacher, its DMS students at CR 2, 4 and 8 (dms-eval's, reused from
the cache dir) and TOVA, H2O, StreamingLLM and Quest at the students' budgets; writes ``hyperscale.json`` and
``hyperscale_{peak_tokens,kv_reads,latency_s}.png`` (accuracy frontiers) into the run dir, a progress line per
method. Examples:
  dms-hyperscale widths=[1,4,16] lengths=[2,4,8] temperature=1.5
  dms-hyperscale eval.crs=[4,8] eval.methods=[vanilla,dms,tova] hardware.bandwidth=4.8e12
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
from dms_megatron.eval.config import HyperscaleConfig
from dms_megatron.eval.hyperscale import run_hyperscale
from dms_megatron.eval.run import StudentRefitError
from dms_megatron.inference.model import ModelLoadError
from dms_megatron.launch.hydra_cli import fail, run_hydra

PROG = "dms-hyperscale"


def _task(dcfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = HyperscaleConfig.from_dict(OmegaConf.to_container(dcfg, resolve=True))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run_hyperscale(cfg, run_dir, log=lambda m: print(f"[{PROG}] {m}", flush=True))
    except (ConfigError, ModelLoadError, CheckpointError, AssetError, FileNotFoundError) as e:
        fail(str(e))
    except StudentRefitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    run_hydra("hyperscale", HyperscaleConfig, HyperscaleConfig.from_dict, _task)


if __name__ == "__main__":
    main()

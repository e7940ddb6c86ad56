"""``dms-eval``: the Hydra launcher of the evaluation harness (configs/eval.yaml; run dir ``hydra.run.dir=DIR``).

With no arguments it evaluates the embedded default: the tiny teacher (built once), its students re-fitted to
CR 2, 4 and 8 (re-fitted once, then reused from the cache dir) and the baselines at DMS-matched budgets, writing
``eval.json`` and ``pareto_*.png`` into the run dir.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dms_megatron.launch.refit import CONFIG_DIR


def _task(dcfg) -> None:
    import yaml
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dms_megatron.config import ConfigError
    from dms_megatron.eval.config import EvalConfig
    from dms_megatron.eval.run import run_eval
    from dms_megatron.inference.model import ModelLoadError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = EvalConfig.from_dict(OmegaConf.to_container(dcfg, resolve=True))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run_eval(cfg, run_dir)
    except (ConfigError, ModelLoadError, FileNotFoundError) as e:
        print(f"dms-eval: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore

    from dms_megatron.eval.config import EvalConfig

    if not CONFIG_DIR.is_dir():
        print(f"error: config directory {CONFIG_DIR} not found; install the project editable (pip install -e .) "
              f"from its source checkout", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("WANDB_MODE", "offline")
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()

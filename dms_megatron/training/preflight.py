"""The pre-flight of a re-fit, run once per launch: the run's inputs resolved (``RunInputs``: teacher and its
architecture, tokenizer, data, held-out items) and its layout checked against that architecture and the world size.

``dms-refit`` runs ``preflight(cfg)`` before Hydra makes a run dir and hands the result (``Checked``) on instead of
resolving again: to the trainer in-process for one rank, as the run dir's ``inputs.json`` to its local ranks
(``python -m dms_megatron.launch.worker --run-dir DIR --inputs DIR/inputs.json``). A rank started without it
(torchrun, srun, a test) runs the pre-flight itself, once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dms_megatron.config import ConfigError, ModelConfig, RefitConfig, check_batch_split
from dms_megatron.megatron.distributed import validate_model_layout
from dms_megatron.progress import say
from dms_megatron.training.inputs import RunInputs

#: the launcher's hand-off of its pre-flight to its local ranks, in the run dir
INPUTS = "inputs.json"


@dataclass(frozen=True)
class Checked:
    """What the pre-flight found for ``cfg``: its inputs, and the data-parallel size ``dp`` of ``world`` ranks."""

    cfg: RefitConfig
    inputs: RunInputs
    world: int
    dp: int

    def built(self, log=say) -> "Checked":
        """With the embedded default's data built (``RunInputs.built``)."""
        return dataclasses.replace(self, inputs=self.inputs.built(self.cfg, log))

    def for_world(self, world: int) -> "Checked":
        """Itself for the world size it was checked for; for another (a batch job's own rank count) the layout
        checked for that one."""
        if world == self.world:
            return self
        return dataclasses.replace(self, world=world, dp=check_layout(self.cfg, self.inputs.model_config, world))


def check_layout(cfg: RefitConfig, mc: ModelConfig, world: int) -> int:
    """The layout's dp: tp x pp fits the teacher's architecture ``mc`` and ``world`` ranks, and for a world other
    than the configured one (whose batch split RefitConfig checked) the global batch splits over its dp."""
    p = cfg.parallel
    try:
        dp = validate_model_layout(mc, p.tp, p.pp, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if world != p.world_size:
        check_batch_split(cfg.train, dp)
    return dp


def preflight(cfg: RefitConfig, world: Optional[int] = None, build: bool = False, log=say) -> Checked:
    """Resolve the inputs of ``cfg`` and check its layout for ``world`` ranks (default: the configured ones);
    ``build`` also builds the embedded default's data. One-line ConfigError for anything wrong."""
    inputs = RunInputs.resolve(cfg, build=build, log=log)
    world = cfg.parallel.world_size if world is None else world
    return Checked(cfg, inputs, world, check_layout(cfg, inputs.model_config, world))


def save_checked(checked: Checked, path: Path) -> Path:
    """``checked`` as JSON at ``path`` (written atomically); returns ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"config": checked.cfg.to_dict(), "inputs": checked.inputs.to_dict(),
                               "world": checked.world, "dp": checked.dp}, indent=1))
    tmp.replace(path)
    return path


def load_checked(path: Path, cfg: RefitConfig) -> Checked:
    """The pre-flight saved at ``path`` for ``cfg``; ConfigError if it is missing or was made for another config."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable pre-flight record ({e}): start the ranks without --inputs "
                          f"(each then runs the pre-flight) or run dms-refit again") from None
    if d.get("config") != json.loads(json.dumps(cfg.to_dict())):
        raise ConfigError(f"{path} holds the pre-flight of another config than the run's config.yaml: start the "
                          f"ranks without --inputs (each then runs the pre-flight) or run dms-refit again")
    return Checked(cfg, RunInputs.from_dict(d["inputs"]), d["world"], d["dp"])


__all__ = ["Checked", "preflight", "check_layout", "save_checked", "load_checked", "INPUTS"]

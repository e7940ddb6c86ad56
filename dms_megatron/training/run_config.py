"""A run dir's identity: its ``config.yaml``. A new run writes it; re-running into the same dir resumes, and then the
new settings must agree with it: a change of the model, the DMS rule, the data or the optimisation is refused (one
line naming the keys), except the few safe keys listed in ``resume.allow_changes``. The layout (``parallel.*``,
checkpoints reshard), logging and the resume policy itself may always differ. The file is never silently
overwritten: an allowed change keeps the previous one as ``config.prev-<n>.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

from dms_megatron.config import ConfigError, RefitConfig

CONFIG = "config.yaml"
ALWAYS_FREE = ("parallel.", "logging.", "resume.")
#: keys ``resume.allow_changes`` may name: they change how long / how often / how state is written, not what is trained
ALLOWABLE = ("train.steps", "train.save_interval", "train.eval_interval", "train.eval_batches",
             "train.recall_eval_limit", "train.async_save", "train.dist_optim_sharding")


def _flatten(d: dict, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> List[Tuple[str, object, object]]:
    """(key, old value, new value) for every setting that differs, layout / logging / resume policy excluded."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(ALWAYS_FREE)]


def check_resume(run_dir: Path, cfg: RefitConfig) -> List[Tuple[str, object, object]]:
    """The allowed changes of ``cfg`` against the run dir's config.yaml ([] for a new run); ConfigError otherwise."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return []
    bad_allow = [k for k in cfg.resume.allow_changes if k not in ALLOWABLE]
    if bad_allow:
        raise ConfigError(f"resume.allow_changes={bad_allow} may only name {', '.join(ALLOWABLE)} (other keys change "
                          f"the model, the DMS rule, the data or the optimisation: start a new run dir)")
    try:
        old = RefitConfig.from_dict(yaml.safe_load(path.read_text())).to_dict()
    except (ConfigError, yaml.YAMLError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a readable run config ({str(e).splitlines()[0]}): start a new run dir")
    changes = config_changes(old, cfg.to_dict())
    refused = [c for c in changes if c[0] not in cfg.resume.allow_changes]
    if refused:
        said = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in refused)
        raise ConfigError(f"{run_dir} holds a run with other settings ({said}); use a new run dir, or for "
                          f"{', '.join(ALLOWABLE)} only, pass resume.allow_changes=[KEY,...]")
    return changes


def write_run_config(run_dir: Path, cfg: RefitConfig) -> List[Tuple[str, object, object]]:
    """Check (``check_resume``) and write ``config.yaml`` atomically; returns the allowed changes it recorded."""
    run_dir = Path(run_dir)
    changes = check_resume(run_dir, cfg)
    path = run_dir / CONFIG
    if path.is_file() and not changes and not _differs(path, cfg):
        return []
    run_dir.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        n = 1
        while (run_dir / f"config.prev-{n}.yaml").exists():
            n += 1
        os.replace(path, run_dir / f"config.prev-{n}.yaml")
    tmp = run_dir / (CONFIG + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return changes


def _differs(path: Path, cfg: RefitConfig) -> bool:
    return yaml.safe_load(path.read_text()) != cfg.to_dict()


__all__ = ["check_resume", "write_run_config", "config_changes", "ALLOWABLE", "CONFIG"]

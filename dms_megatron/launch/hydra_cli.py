"""What the Hydra launchers (dms-refit, dms-eval, dms-dryrun) share: the packaged config dir, the schema in Hydra's
ConfigStore, and a pre-flight composition that turns every Hydra / OmegaConf error into one ``error:`` line with a
"did you mean" (exit 2) before Hydra prints its multi-line report or any run dir is made.

The configs live inside the package (``dms_megatron/configs``), so an installed wheel has them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dms_megatron.config import BAD_INPUT_EXIT_CODE, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def fail(msg: str) -> None:
    """One ``error: ...`` line on stderr (the form every bad-input exit of the package prints) and exit 2."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE)


def register_schema(name: str, cls) -> None:
    ConfigStore.instance().store(name=name, node=cls)


def job_overrides(argv: Sequence[str]) -> List[str]:
    """The config overrides among a command line's arguments (no flags, nothing of Hydra's own), each sweep reduced
    to its first value: one point of the job to validate."""
    args = [a for a in argv if not a.startswith("-") and "=" in a or a.startswith(("~", "+"))]
    args = [a for a in args if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    out = []
    for o in OverridesParser.create().parse_overrides(args):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


def schema_keys(cls, prefix: str = "") -> List[str]:
    """Every dotted key of a (nested) config dataclass."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            keys += schema_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


#: Megatron-LM / NeMo argument names a user may type, and this schema's key for each
MEGATRON_NAMES = {
    "train_iters": "train.steps", "lr_warmup_iters": "train.warmup_steps", "warmup_iters": "train.warmup_steps",
    "max_steps": "train.steps", "seq_len": "train.seq_length", "encoder_seq_length": "train.seq_length",
    "max_seq_length": "train.seq_length", "micro_batch": "train.micro_batch_size",
    "load": "train.init_checkpoint", "pretrained_checkpoint": "train.init_checkpoint",
    "bf16": "train.precision", "fp16": "train.precision", "use_distributed_optimizer": "train.distributed_optimizer",
    "tensor_model_parallel_size": "parallel.tp", "pipeline_model_parallel_size": "parallel.pp",
    "data_path": "data.blend", "train_data_path": "data.train_blend", "valid_data_path": "data.valid_blend",
    "split": "data.split", "tokenizer_model": "data.tokenizer", "log_interval": "logging.log_interval",
}


def suggest_key(key: str, keys: Iterable[str]) -> Optional[str]:
    """The schema key meant by an unknown ``key``: its Megatron-LM name, else the closest name in the same section,
    else the same name in the closest section (None if nothing is close)."""
    keys = list(keys)
    section, _, leaf = key.rpartition(".")
    if leaf in MEGATRON_NAMES:
        return MEGATRON_NAMES[leaf]
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    near = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.7)
    if near:
        return siblings[near[0]]
    same_leaf = {k.rpartition(".")[0]: k for k in keys if k.rpartition(".")[2] == leaf}
    near = difflib.get_close_matches(section, list(same_leaf), n=1, cutoff=0.5)
    return same_leaf[near[0]] if near else None


def explain(e: Exception, keys: Iterable[str]) -> str:
    """One line for a Hydra / OmegaConf composition error, with the closest valid key or group option."""
    text = "\n".join(str(x) for x in (e, e.__cause__) if x is not None)  # Hydra wraps OmegaConf's reason
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    override = re.search(r"(?:Could not override|Error merging override) '?([^'=\s]+)", text)
    full_key = re.search(r"full_key: (\S+)", text)
    key = override.group(1) if override else (full_key.group(1) if full_key else None)
    if key is None:
        m = re.search(r"Key '([^']+)' (?:is )?not in", text)
        key = m.group(1) if m else None
    typed = re.search(r"Value '([^']*)' of type '\w+' could not be converted to (\w+)", text)
    if typed and key:
        return f"{key}={typed.group(1)} is invalid: must be {typed.group(2).lower()}"
    group = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if group:
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        near = difflib.get_close_matches(group.group(2), options, n=1, cutoff=0.4)
        hint = f"did you mean {group.group(1)}={near[0]}? " if near else ""
        return f"{group.group(1)}={group.group(2)} is not a preset; {hint}(available: {', '.join(options)})"
    if "not in" in text or "Could not override" in text or "Could not append" in text:
        near = suggest_key(key or "", keys)
        return f"unknown key {key!r}" + (f"; did you mean {near}?" if near else "")
    return f"{first}" + (f" ({key})" if key and key not in first else "")


def preflight(config_name: str, argv: Sequence[str], schema, build: Callable[[dict], object]) -> object:
    """Compose ``config_name`` with the command line's overrides (first sweep point) and build the validated config
    with ``build``; any error is one ``error:`` line and exit 2. Returns the built config."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=job_overrides(argv))
        return build(OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(explain(e, schema_keys(schema)))
    finally:
        GlobalHydra.instance().clear()


HELP_FLAGS = ("--help", "-h", "--hydra-help", "--info")


def run_hydra(config_name: str, schema, build: Callable[[dict], object], task: Callable) -> None:
    """The launchers' main: the schema into Hydra's ConfigStore as ``<config_name>_schema``, the pre-flight (unless
    asking for help or the config), then Hydra with ``task`` (a run dir, sweeps, launcher plugins)."""
    register_schema(f"{config_name}_schema", schema)
    if not any(a in HELP_FLAGS or a.startswith("--cfg") for a in sys.argv[1:]):
        preflight(config_name, sys.argv[1:], schema, build)
    hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)()


__all__ = ["CONFIG_DIR", "register_schema", "job_overrides", "preflight", "explain", "schema_keys", "fail",
           "run_hydra"]

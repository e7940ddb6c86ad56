"""What the Hydra launchers (dms-refit, dms-eval, dms-dryrun) share: the packaged config dir, the schema in Hydra's
ConfigStore, and a pre-flight composition that turns every Hydra / OmegaConf error into one ``error:`` line with a
"did you mean" (exit 2) before Hydra prints its multi-line report or any run dir is made.

The configs live at the top level (``configs/``); the package reaches them as ``dms_megatron/configs`` (a link in the
source tree, the files themselves in a built wheel), so an installed wheel has them.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                              ValidationError)

from dms_megatron.config import BAD_INPUT_EXIT_CODE, ConfigError, MissingValue

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


def schema_fields(cls, prefix: str = "") -> Dict[str, Any]:
    """Every dotted leaf key of a (nested) config dataclass -> its resolved type annotation."""
    hints = typing.get_type_hints(cls)
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out.update(schema_fields(sub, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = hints[f.name]
    return out


def schema_keys(cls, prefix: str = "") -> List[str]:
    """Every dotted key of a (nested) config dataclass."""
    return list(schema_fields(cls, prefix))


def _type_word(annotation) -> str:
    """What a value of ``annotation`` must be, in the words of a one-line error ("integer", "float", ...)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    origin = typing.get_origin(annotation) or annotation
    return {int: "integer", float: "float", bool: "boolean", str: "string", list: "a list",
            dict: "a mapping"}.get(origin, getattr(origin, "__name__", str(origin)))


def _is_mapping(annotation) -> bool:
    return (typing.get_origin(annotation) or annotation) is dict


def unknown_override_key(overrides, fields: Dict[str, Any], groups: Iterable[str]) -> Optional[str]:
    """The key of the first parsed override the schema lacks (a config group, a ``+`` addition, a key under a
    mapping field and a section replaced whole are left to Hydra and the dataclass), else None."""
    sections = {k.rsplit(".", 1)[0] for k in fields if "." in k}
    sections |= {".".join(k.split(".")[:i]) for k in sections for i in range(1, k.count(".") + 1)}
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or "/" in key or "@" in key or key in groups or key in sections:
            continue
        if key in fields or any(key.startswith(k + ".") and _is_mapping(t) for k, t in fields.items()):
            continue
        return key
    return None


#: Megatron-LM / NeMo argument names a user may type, and this schema's key for each
MEGATRON_NAMES = {
    "train_iters": "train.steps", "lr_warmup_iters": "train.warmup_steps", "warmup_iters": "train.warmup_steps",
    "max_steps": "train.steps", "seq_len": "train.seq_length", "encoder_seq_length": "train.seq_length",
    "max_seq_length": "train.seq_length", "micro_batch": "train.micro_batch_size",
    "load": "train.init_checkpoint", "pretrained_checkpoint": "train.init_checkpoint",
    "bf16": "train.precision", "fp16": "train.precision", "use_distributed_optimizer": "train.distributed_optimizer",
    "dist_ckpt_optim_fully_reshardable": "train.dist_optim_sharding",
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


def unknown_key_line(key: str, keys: Iterable[str]) -> str:
    near = suggest_key(key, keys)
    return f"unknown key {key!r}" + (f"; did you mean {near}?" if near else "")


def preset_of(key: str, choices: Dict[str, str]) -> Optional[str]:
    """The preset (``group=name``) whose package holds dotted ``key``, from Hydra's ``runtime.choices`` (keys
    ``model`` or ``model@refit.model``)."""
    for group, name in choices.items():
        g, _, package = group.lstrip("/").partition("@")
        if name and not g.startswith("hydra") and key.startswith((package or g) + "."):
            return f"{g}={name}"
    return None


def missing_line(keys: Sequence[str], choices: Dict[str, str]) -> str:
    """One line for required fields a composed config leaves unset, naming the preset that should give them."""
    preset = preset_of(keys[0], choices)
    where = f"the preset {preset} (configs/{preset.replace('=', '/')}.yaml)" if preset else "the config"
    return (f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} missing (no default): give "
            f"{'it' if len(keys) == 1 else 'them'} in {where} or as {keys[0]}=VALUE")


def explain(e: Exception, fields: Dict[str, Any], choices: Optional[Dict[str, str]] = None) -> str:
    """One line for a Hydra / OmegaConf composition error, read from the exception's type and fields (the missing
    preset and its options, the key and value OmegaConf could not take, a value left unset and the preset that
    should give it) and the schema's types."""
    if isinstance(e, MissingValue):
        return missing_line(e.keys, choices or {})
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        options = list(e.options or [])
        near = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
        hint = f"did you mean {group}={near[0]}? " if near else ""
        return f"{group}={name} is not a preset; {hint}(available: {', '.join(options)})"
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e  # Hydra wraps OmegaConf's reason
    key = getattr(cause, "full_key", None)
    if isinstance(cause, MissingMandatoryValue) and key:
        return missing_line([key], choices or {})
    if isinstance(cause, ValidationError) and key in fields:
        return f"{key}={cause.value} is invalid: must be {_type_word(fields[key])}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        return unknown_key_line(key, fields)
    text = str(e)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return first + (f" ({key})" if key and key not in first else "")


def preflight(config_name: str, argv: Sequence[str], schema, build: Callable[[dict], object]) -> object:
    """Compose ``config_name`` with the command line's overrides (first sweep point) and build the validated config
    with ``build``; any error is one ``error:`` line and exit 2. Returns the built config."""
    GlobalHydra.instance().clear()
    fields = schema_fields(schema)
    choices: Dict[str, str] = {}
    try:
        overrides = job_overrides(argv)
        key = unknown_override_key(OverridesParser.create().parse_overrides(overrides), fields, config_groups())
        if key is not None:
            raise ConfigError(unknown_key_line(key, fields))
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if isinstance(v, str)}
        with open_dict(cfg):
            del cfg["hydra"]
        return build(OmegaConf.to_container(cfg, resolve=True))
    except MissingValue as e:
        fail(explain(e, fields, choices))
    except ConfigError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(explain(e, fields, choices))
    finally:
        GlobalHydra.instance().clear()


def config_groups() -> List[str]:
    """The config groups (preset folders) of the packaged configs: ``model``, ``dms``, ``parallel`` ..."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


HELP_FLAGS = ("--help", "-h", "--hydra-help", "--info")


def run_hydra(config_name: str, schema, build: Callable[[dict], object], task: Callable) -> None:
    """The launchers' main: the schema into Hydra's ConfigStore as ``<config_name>_schema``, the pre-flight (unless
    asking for help or the config), then Hydra with ``task`` (a run dir, sweeps, launcher plugins)."""
    register_schema(f"{config_name}_schema", schema)
    if not any(a in HELP_FLAGS or a.startswith("--cfg") for a in sys.argv[1:]):
        preflight(config_name, sys.argv[1:], schema, build)
    hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)()


__all__ = ["CONFIG_DIR", "register_schema", "job_overrides", "preflight", "explain", "missing_line", "preset_of", "schema_keys", "schema_fields",
           "unknown_override_key", "config_groups", "fail", "run_hydra"]

"""The conversion workflows behind ``dms-convert``: HF directory -> megatron dist-checkpoint (``import_checkpoint``)
and megatron checkpoint -> HF directory in the plain or the official DMS format (``export_checkpoint``).

``import`` writes a megatron dist-checkpoint (``iter_0000000`` + tracker) whose common state records
extra["model_config"], extra["dms_config"] (None for a plain model) and extra["hf_config"]; ``dms-refit`` loads it
as the teacher / student init. The tokenizer and other side files are kept under ``<megatron-path>/hf_assets``.
``export`` reads any saved iteration (default: latest). Outputs are written to a temporary sibling directory and
renamed into place only once complete: a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from dms_megatron.checkpoint import CheckpointError, checkpoints_dir, save_checkpoint
from dms_megatron.checkpoint.megatron_lm import checkpoint_configs, load_weights
from dms_megatron.config import ConfigError, DMSConfig, ModelConfig
from dms_megatron.convert.hf_io import (DTYPES, ConversionError, check_output_dir, finalize_output, iter_side_files,
                                        write_safetensors_streaming)
from dms_megatron.convert.hf_model import DEFAULT_DIVISIBLE_BY, load_hf_into_model, read_hf_model, uses_te_names
from dms_megatron.convert.mapping import ExportProducer, dms_to_hf, export_plan, pp_layer_range, uses_adapter
from dms_megatron.convert.progress import ByteProgress
from dms_megatron.families import FAMILIES, family_by_name
from dms_megatron.families.rules import bind_rules
from dms_megatron.megatron.distributed import destroy_process_groups, init_process_groups, rank
from dms_megatron.megatron.model import build_gpt_model, transformer_config

ASSETS = "hf_assets"


def _process_groups(tp: int, pp: int) -> bool:
    """Initialise process groups for a conversion; True if this call created torch.distributed (and must tear it
    down), False when the caller (a test session, a training job) already owns it."""
    owned = not dist.is_initialized()
    init_process_groups(tp, pp)
    return owned


def _release(owned: bool) -> None:
    if owned:
        destroy_process_groups()


def _tmp_sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}.tmp"


def check_import(hf_dir, megatron_path, *, tp: int = 1, pp: int = 1, dtype: str = "float32",
                 divisible_by: int = DEFAULT_DIVISIBLE_BY):
    """Every check of an import that needs no process: output dir, dtype, the HF model and the layout. Returns
    (output dir, family, ModelConfig, DMSConfig or None, config.json dict, reader); one-line ConversionError."""
    out = check_output_dir(megatron_path)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp {tp} / --pp {pp} must be >= 1")
    fam, mc, dms, hf, reader, _ = read_hf_model(hf_dir, tp=tp, divisible_by=divisible_by)
    pp_layer_range(mc, pp, 0)
    for value, what in ((mc.num_attention_heads, "query heads"), (mc.ffn_hidden_size, "ffn_hidden_size")):
        if value % tp:
            raise ConversionError(f"--tp {tp} does not divide the model's {value} {what}: choose among its divisors")
    if mc.num_query_groups % tp and tp % mc.num_query_groups:
        raise ConversionError(f"--tp {tp} must divide or be a multiple of the {mc.num_query_groups} KV heads")
    return out, fam, mc, dms, hf, reader


def import_checkpoint(hf_dir, megatron_path, *, tp: int = 1, pp: int = 1, dtype: str = "float32",
                      divisible_by: int = DEFAULT_DIVISIBLE_BY) -> Path:
    """HF directory -> megatron checkpoint at ``megatron_path`` (run in every rank of a tp*pp world)."""
    out, fam, mc, dms, hf, reader = check_import(hf_dir, megatron_path, tp=tp, pp=pp, dtype=dtype,
                                                 divisible_by=divisible_by)
    owned = _process_groups(tp, pp)
    tmp = _tmp_sibling(out, "import")
    try:
        dt = DTYPES[dtype]
        tcfg = transformer_config(mc, tp=tp, pp=pp, perform_initialization=False, params_dtype=dt,
                                  pipeline_dtype=dt, bf16=dt == torch.bfloat16, fp16=dt == torch.float16)
        model = build_gpt_model(mc, dms, seq_length=mc.max_position_embeddings, config=tcfg)
        load_hf_into_model(model, reader, fam, mc, dms)
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        extra = {"model_config": asdict(mc), "dms_config": None if dms is None else asdict(dms),
                 "hf_config": hf, "converted_from": str(Path(hf_dir).resolve())}
        save_checkpoint(tmp, 0, model, extra=extra)
        if rank() == 0:
            assets = tmp / ASSETS
            assets.mkdir()
            for p in iter_side_files(hf_dir):
                shutil.copy2(p, assets / p.name)
            finalize_output(tmp, out)
    except (OSError, CheckpointError) as e:  # disk full, file-size limit: one line, nothing left behind
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConversionError(f"writing {out} failed: {e.strerror or e} ({e.filename or tmp})") from e
        raise ConversionError(f"importing into {out} failed: {e}") from e
    except BaseException:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(owned)
    return out


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------
def _hf_dtype_name(hf: dict) -> Optional[str]:
    d = hf.get("dtype") or hf.get("torch_dtype")
    return d if d in DTYPES else None


def build_hf_config(mc: ModelConfig, dms: Optional[DMSConfig], fmt: str, dtype: str, base: Optional[dict]) -> dict:
    """config.json for an export: the original HF config (if recorded and of the same family) overlaid with the
    architecture from ``mc``; ``fmt="dms"`` adds the official DMS keys (and, for a family with official DMS
    modeling code, its ``auto_map``), ``"plain"`` strips any DMS keys."""
    fam = family_by_name(mc.family)
    cfg = dict(base or {})
    if cfg and cfg.get("model_type") != fam.model_type:
        cfg = {}
    cfg = {k: v for k, v in cfg.items() if not k.startswith("dms_") and k != "auto_map"}
    cfg.pop("rope_parameters", None)  # replaced by the legacy rope_theta / rope_scaling keys (read by 4.x and 5.x)
    cfg.update(fam.to_hf(mc))
    cfg["torch_dtype"] = dtype
    cfg.pop("dtype", None)
    if fmt == "dms":
        if dms is None:
            raise ConversionError("--format dms: the checkpoint records no dms_config (a plain model); "
                                  "use --format plain")
        cfg.update(dms_to_hf(dms))
        if fam.dms_auto_map:  # the family's official DMS modeling code (loaded with trust_remote_code)
            cfg.pop("architectures", None)
            cfg["auto_map"] = dict(fam.dms_auto_map)
    return cfg


def export_tensors(model, mc: ModelConfig, dms: Optional[DMSConfig], fmt: str, out_dir, dtype: torch.dtype,
                   max_shard_bytes: int) -> None:
    """Stream a (tp=1, pp=1) megatron model's weights to HF safetensors in ``out_dir``."""
    fam = family_by_name(mc.family)
    bound = bind_rules(fam.rules, mc, adapter=fmt == "dms" and uses_adapter(dms), te=uses_te_names(model))
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    used = {b.megatron for b in bound}
    dropped = [k for k in params if k not in used and not (fmt == "plain" and "dms_alpha" in k)]
    if dropped:
        raise ConversionError(f"megatron tensor {dropped[0]!r} has no HF mapping ({len(dropped)} such): "
                              f"refusing a partial export")

    def get(name: str) -> torch.Tensor:
        if name not in params:
            raise ConversionError(f"checkpoint has no tensor {name!r}")
        return params[name]

    plan = export_plan(bound, lambda b: dtype)
    progress = ByteProgress(f"dms-convert export: writing {out_dir}", sum(t.nbytes for t in plan))
    write_safetensors_streaming(out_dir, plan, ExportProducer(bound, get, mc, dtype),
                                max_shard_bytes=max_shard_bytes, progress=progress.add)


def remote_code_files(config: dict) -> List[str]:
    """The Python files a config's ``auto_map`` makes transformers load with trust_remote_code (sorted)."""
    return sorted({ref.split(".")[0] + ".py" for ref in (config.get("auto_map") or {}).values()})


def check_modeling_code(config: dict, modeling_code: Optional[Path]) -> List[Path]:
    """The files of ``modeling_code`` an export must carry for its auto_map; a one-line ConversionError for a
    missing one or an export without auto_map; [] (and a note on stderr) when no directory is given."""
    needed = remote_code_files(config)
    if modeling_code is None:
        if needed:
            print(f"note: the export's auto_map names {', '.join(needed)}, which it does not contain: pass "
                  f"--modeling-code DIR (the official Qwen3-DMS code, NVIDIA Model-Optimizer "
                  f"experimental/dms/models/qwen3) so AutoModelForCausalLM.from_pretrained(OUT, "
                  f"trust_remote_code=True) can load it", file=sys.stderr)
        return []
    if not needed:
        coded = ", ".join(f.name for f in FAMILIES.values() if f.dms_auto_map)
        raise ConversionError(f"--modeling-code: this export has no auto_map (only --format dms of a model of a "
                              f"family with official DMS modeling code ({coded}) loads through remote code)")
    missing = [n for n in needed if not (Path(modeling_code) / n).is_file()]
    if missing:
        raise ConversionError(f"--modeling-code {modeling_code} lacks {', '.join(missing)} (the export's auto_map "
                              f"names {', '.join(needed)})")
    return [Path(modeling_code) / n for n in needed]


def unimportable_modules(files: List[Path]) -> List[str]:
    """Top-level modules the given Python files import (absolutely) that this environment cannot import."""
    names = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def export_checkpoint(megatron_path, hf_path, *, fmt: str = "dms", iteration: Optional[int] = None,
                      dtype: Optional[str] = None, max_shard_bytes: int = 5 * 1024 ** 3,
                      modeling_code: Optional[Path] = None) -> Path:
    """Megatron checkpoint (this project's or Megatron-LM's; any saved layout, loaded at tp=1, pp=1) -> HF
    directory ``hf_path`` (with the files of ``modeling_code`` its auto_map names, for ``trust_remote_code``
    loading). ``megatron_path`` may also be a dms-refit run dir (its ``checkpoints/``)."""
    out = check_output_dir(hf_path)
    megatron_path = checkpoints_dir(megatron_path)
    if fmt not in ("dms", "plain"):
        raise ConversionError(f"--format {fmt!r} is not supported; allowed: dms, plain")
    try:
        mc, dms, extra = checkpoint_configs(megatron_path, iteration)
    except (CheckpointError, ConfigError) as e:
        raise ConversionError(str(e)) from None
    base = extra.get("hf_config")
    dtype = dtype or _hf_dtype_name(base or {}) or "float32"
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    config = build_hf_config(mc, dms, fmt, dtype, base)
    code = check_modeling_code(config, modeling_code)
    if fmt == "plain" and dms is not None and dms.alpha_source == "qneuron":
        print(f"note: {megatron_path} holds a q-neuron DMS student; --format plain drops the DMS semantics "
              f"(the borrowed query neuron is used as an ordinary query dimension)", file=sys.stderr)
    tmp = _tmp_sibling(out, "export")
    shutil.rmtree(tmp, ignore_errors=True)
    owned = _process_groups(1, 1)
    try:
        tcfg = transformer_config(mc, perform_initialization=False)
        model = build_gpt_model(mc, dms, seq_length=mc.max_position_embeddings, config=tcfg)
        try:
            load_weights(megatron_path, model, iteration)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
        tmp.mkdir(parents=True)
        export_tensors(model, mc, dms, fmt, tmp, DTYPES[dtype], max_shard_bytes)
        del model
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        assets = Path(megatron_path) / ASSETS
        for p in (sorted(assets.iterdir()) if assets.is_dir() else []) + code:
            shutil.copy2(p, tmp / p.name)
        finalize_output(tmp, out)
    except OSError as e:  # disk full, file-size limit, permissions: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"writing {out} failed: {e.strerror or e} ({e.filename or tmp})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(owned)
    missing = unimportable_modules(code)
    if missing:
        print(f"note: the modeling code imports {', '.join(missing)}, which this environment lacks; install it "
              f"where the model is loaded (the official code needs the `dms` package of Model-Optimizer)",
              file=sys.stderr)
    return out


__all__ = ["check_import", "import_checkpoint", "export_checkpoint", "build_hf_config", "export_tensors", "ASSETS",
           "remote_code_files", "check_modeling_code", "unimportable_modules"]

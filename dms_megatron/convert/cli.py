"""``dms-convert``: Hugging Face <-> megatron checkpoints (verbs and flags after Megatron-Bridge's converter).

    dms-convert import --hf-model DIR --megatron-path DIR [--tp N --pp N] [--dtype float32]
    dms-convert export --megatron-path DIR --hf-path DIR [--format dms|plain] [--iteration N] [--dtype ...]

``import`` writes a megatron dist-checkpoint (``iter_0000000`` + tracker) whose common state records
extra["model_config"], extra["dms_config"] (None for a plain model) and extra["hf_config"]; ``dms-refit`` loads it
as the teacher / student init. The tokenizer and other side files are kept under ``<megatron-path>/hf_assets``.
``export`` reads any saved iteration (default: latest). Outputs are written to a temporary sibling directory and
renamed into place only once complete: a failed conversion leaves nothing behind.

With --tp/--pp > 1 and no torchrun environment, import relaunches itself under torchrun with tp*pp processes;
each rank reads only the HF tensors it holds. (Megatron dist-checkpoints are reshardable: any layout loads them.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Tuple

import torch

from dms_megatron.config import ConfigError, DMSConfig, ModelConfig, from_dict
from dms_megatron.convert import family_by_name, family_for_hf_config
from dms_megatron.convert.hf_io import (ConversionError, SafetensorsReader, check_output_dir, finalize_output,
                                        iter_side_files, read_config, write_safetensors_streaming)
from dms_megatron.convert.mapping import (DMS_AUTO_MAP, TP_ROWS, BoundRule, ExportProducer, VocabPad, bind_rules,
                                          dms_from_hf, dms_to_hf, export_plan, pp_layer_range, tp_shard,
                                          validate_hf_tensors)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ASSETS = "hf_assets"
DEFAULT_DIVISIBLE_BY = 128


# ---------------------------------------------------------------------------------------------------------------
# HF side
# ---------------------------------------------------------------------------------------------------------------
def read_hf_model(hf_dir, *, tp: int = 1, divisible_by: int = DEFAULT_DIVISIBLE_BY):
    """Validate a HF checkpoint directory without loading tensors.

    Returns (family, ModelConfig, DMSConfig or None, config.json dict, reader, bound rules). The padded vocab is a
    multiple of ``divisible_by`` and of ``tp``.
    """
    hf = read_config(hf_dir)
    fam = family_for_hf_config(hf, f"{Path(hf_dir) / 'config.json'}")
    try:
        mc = fam.from_hf(hf, divisible_by)
        if mc.padded_vocab_size % tp:
            mc = fam.from_hf(hf, divisible_by * tp)
        dms = dms_from_hf(hf)
    except ConfigError as e:
        raise ConversionError(f"{Path(hf_dir) / 'config.json'}: {e}") from None
    reader = SafetensorsReader(hf_dir)
    bound = bind_rules(fam.rules, mc, adapter=dms is not None and dms.alpha_source == "adapter")
    available = {n: (i.shape, i.dtype) for n, i in reader.infos.items()}
    if mc.tie_embeddings and "lm_head.weight" in available:
        # Some tied checkpoints also store the head; accept it only if it really is the embedding.
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ConversionError(f"{hf_dir}: tie_word_embeddings=true but lm_head.weight differs from "
                                  f"model.embed_tokens.weight; set tie_word_embeddings=false in config.json")
        del available["lm_head.weight"]
    validate_hf_tensors(bound, available, str(hf_dir))
    return fam, mc, dms, hf, reader, bound


def _local_name(b: BoundRule, cfg: ModelConfig, pp: int, pp_rank: int) -> Optional[str]:
    """Name of bound rule ``b`` in the model of pipeline stage ``pp_rank`` (None if the stage does not hold it)."""
    if b.layer is not None:
        layers = pp_layer_range(cfg, pp, pp_rank)
        if b.layer not in layers:
            return None
        return b.megatron.replace(f"layers.{b.layer}.", f"layers.{b.layer - layers.start}.", 1)
    if b.megatron.startswith("embedding."):
        return b.megatron if pp_rank == 0 else None
    return b.megatron if pp_rank == pp - 1 else None


def _uses_te_names(model) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in model.state_dict())


def load_hf_into_model(model, reader: SafetensorsReader, fam, mc: ModelConfig, dms: Optional[DMSConfig]) -> int:
    """Stream the HF tensors this rank holds into ``model`` (one rule at a time). Every parameter of ``model`` must
    be written exactly once; returns the number of tensors written."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    bound = bind_rules(fam.rules, mc, adapter=dms is not None and dms.alpha_source == "adapter",
                       te=_uses_te_names(model))
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    written = set()

    def put(name: str, full: torch.Tensor, kind: str) -> None:
        if name not in params:
            raise ConversionError(f"megatron model has no parameter {name!r} (model built with another config?)")
        shard = tp_shard(full, kind, tp, tp_rank)
        dst = params[name]
        if tuple(dst.shape) != tuple(shard.shape):
            raise ConversionError(f"{name}: converted shard {list(shard.shape)} does not match the megatron "
                                  f"parameter {list(dst.shape)} (tp={tp})")
        with torch.no_grad():
            dst.copy_(shard)
        written.add(name)

    for b in bound:
        name = _local_name(b, mc, pp, pp_rank)
        tied_head = mc.tie_embeddings and pp > 1 and pp_rank == pp - 1 and b.megatron.startswith("embedding.word")
        if name is None and not tied_head:
            continue
        targets = ([name] if name is not None else []) + (["output_layer.weight"] if tied_head else [])
        # (a tied head: the last stage keeps its own copy of the tied embedding as the output layer)
        if isinstance(b.rule.transform, VocabPad) and b.rule.tp == TP_ROWS:
            (w,) = [reader.get(n) for n in b.hf]  # pad in place: no padded copy of the (largest) vocab tensor
            for t in targets:
                if t not in params or params[t].shape[0] * tp != mc.padded_vocab_size:
                    raise ConversionError(f"megatron parameter {t!r} missing or not [{mc.padded_vocab_size}/{tp}, "
                                          f"hidden] (model built with another config?)")
                with torch.no_grad():
                    VocabPad.fill_shard(w, params[t], tp, tp_rank)
                written.add(t)
            del w
            continue
        full = b.rule.transform.to_megatron([reader.get(n) for n in b.hf], mc)
        for t in targets:
            put(t, full, b.rule.tp)
        del full
    missing = sorted(set(params) - written)
    if missing:
        raise ConversionError(f"megatron parameter {missing[0]!r} has no source tensor ({len(missing)} such): "
                              f"mapping incomplete for this model")
    return len(written)


# ---------------------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------------------
def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _process_groups(tp: int, pp: int) -> bool:
    """Initialise process groups for a conversion; True if this call created torch.distributed (and must tear it
    down), False when the caller (a test session, a training job) already owns it."""
    import torch.distributed as dist

    from dms_megatron.megatron.distributed import init_process_groups

    owned = not dist.is_initialized()
    init_process_groups(tp, pp)
    return owned


def _release(owned: bool) -> None:
    from dms_megatron.megatron.distributed import destroy_process_groups

    if owned:
        destroy_process_groups()


def _tmp_sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}.tmp"


def import_checkpoint(hf_dir, megatron_path, *, tp: int = 1, pp: int = 1, dtype: str = "float32",
                      divisible_by: int = DEFAULT_DIVISIBLE_BY) -> Path:
    """HF directory -> megatron checkpoint at ``megatron_path`` (run in every rank of a tp*pp world)."""
    from dms_megatron.megatron.model import build_gpt_model, transformer_config
    from dms_megatron.training.checkpointing import save_checkpoint

    out = check_output_dir(megatron_path)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    fam, mc, dms, hf, reader, _ = read_hf_model(hf_dir, tp=tp, divisible_by=divisible_by)
    pp_layer_range(mc, pp, 0)  # divisibility check before starting processes
    if mc.num_query_groups % tp and tp % mc.num_query_groups:
        raise ConversionError(f"--tp {tp} must divide or be a multiple of the {mc.num_query_groups} KV heads")
    owned = _process_groups(tp, pp)
    tmp = _tmp_sibling(out, "import")
    try:
        dt = DTYPES[dtype]
        tcfg = transformer_config(mc, tp=tp, pp=pp, perform_initialization=False, params_dtype=dt,
                                  pipeline_dtype=dt, bf16=dt == torch.bfloat16, fp16=dt == torch.float16)
        model = build_gpt_model(mc, dms, seq_length=mc.max_position_embeddings, config=tcfg)
        load_hf_into_model(model, reader, fam, mc, dms)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        extra = {"model_config": asdict(mc), "dms_config": None if dms is None else asdict(dms),
                 "hf_config": hf, "converted_from": str(Path(hf_dir).resolve())}
        save_checkpoint(tmp, 0, model, extra=extra)
        if _rank() == 0:
            assets = tmp / ASSETS
            assets.mkdir()
            for p in iter_side_files(hf_dir):
                shutil.copy2(p, assets / p.name)
            finalize_output(tmp, out)
    except BaseException:
        if _rank() == 0:
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
    architecture from ``mc``; ``fmt="dms"`` adds the official Qwen3-DMS keys, ``"plain"`` strips any DMS keys."""
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
        if fam.name == "qwen3":  # the official DMS modeling code exists for Qwen3 (loaded with trust_remote_code)
            cfg.pop("architectures", None)
            cfg["auto_map"] = dict(DMS_AUTO_MAP)
    return cfg


def read_checkpoint_configs(megatron_path, iteration: Optional[int] = None) -> Tuple[ModelConfig, Optional[DMSConfig],
                                                                                      dict]:
    from dms_megatron.training.checkpointing import CheckpointError, read_extra

    try:
        extra = read_extra(megatron_path, iteration)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if "model_config" not in extra:
        raise ConversionError(f"{megatron_path}: checkpoint does not record extra['model_config'] "
                              f"(not written by dms-convert import or dms-refit)")
    mc = from_dict(ModelConfig, extra["model_config"])
    dms = from_dict(DMSConfig, extra["dms_config"]) if extra.get("dms_config") else None
    return mc, dms, extra


def export_tensors(model, mc: ModelConfig, dms: Optional[DMSConfig], fmt: str, out_dir, dtype: torch.dtype,
                   max_shard_bytes: int) -> None:
    """Stream a (tp=1, pp=1) megatron model's weights to HF safetensors in ``out_dir``."""
    fam = family_by_name(mc.family)
    adapter = fmt == "dms" and dms is not None and dms.alpha_source == "adapter"
    bound = bind_rules(fam.rules, mc, adapter=adapter, te=_uses_te_names(model))
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
    write_safetensors_streaming(out_dir, plan, ExportProducer(bound, get, mc, dtype),
                                max_shard_bytes=max_shard_bytes)


def export_checkpoint(megatron_path, hf_path, *, fmt: str = "dms", iteration: Optional[int] = None,
                      dtype: Optional[str] = None, max_shard_bytes: int = 5 * 1024 ** 3) -> Path:
    """Megatron checkpoint (any saved layout; loaded at tp=1, pp=1) -> HF directory ``hf_path``."""
    from dms_megatron.megatron.model import build_gpt_model, transformer_config
    from dms_megatron.training.checkpointing import CheckpointError, load_model_weights

    out = check_output_dir(hf_path)
    if fmt not in ("dms", "plain"):
        raise ConversionError(f"--format {fmt!r} is not supported; allowed: dms, plain")
    mc, dms, extra = read_checkpoint_configs(megatron_path, iteration)
    base = extra.get("hf_config")
    dtype = dtype or _hf_dtype_name(base or {}) or "float32"
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    config = build_hf_config(mc, dms, fmt, dtype, base)
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
            load_model_weights(megatron_path, model, iteration)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
        tmp.mkdir(parents=True)
        export_tensors(model, mc, dms, fmt, tmp, DTYPES[dtype], max_shard_bytes)
        del model
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        assets = Path(megatron_path) / ASSETS
        if assets.is_dir():
            for p in sorted(assets.iterdir()):
                shutil.copy2(p, tmp / p.name)
        finalize_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(owned)
    return out


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dms-convert", description="Hugging Face <-> megatron checkpoint conversion")
    sub = p.add_subparsers(dest="verb", required=True)
    imp = sub.add_parser("import", help="Hugging Face model directory -> megatron checkpoint")
    imp.add_argument("--hf-model", required=True, help="HF model directory (config.json + safetensors)")
    imp.add_argument("--megatron-path", required=True, help="output checkpoint directory (must not exist or be empty)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert with")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert with")
    imp.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="megatron parameter dtype")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=DEFAULT_DIVISIBLE_BY)
    exp = sub.add_parser("export", help="megatron checkpoint -> Hugging Face model directory")
    exp.add_argument("--megatron-path", required=True, help="checkpoint directory (with latest_checkpointed_iteration)")
    exp.add_argument("--hf-path", required=True, help="output HF directory (must not exist or be empty)")
    exp.add_argument("--format", default="dms", choices=["dms", "plain"],
                     help="dms: official DMS config keys (+ adapter tensors); plain: stock transformers model")
    exp.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    exp.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="HF tensor dtype (default: the original HF dtype, else float32)")
    exp.add_argument("--max-shard-size-mb", type=int, default=5 * 1024)
    return p


def _relaunch_under_torchrun(world: int) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "dms_megatron.convert.cli", *sys.argv[1:]]
    return subprocess.call(cmd)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "import":
            world = args.tp * args.pp
            if world > 1 and "WORLD_SIZE" not in os.environ:
                check_output_dir(args.megatron_path)
                read_hf_model(args.hf_model, tp=args.tp, divisible_by=args.make_vocab_size_divisible_by)
                return _relaunch_under_torchrun(world)
            out = import_checkpoint(args.hf_model, args.megatron_path, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                    divisible_by=args.make_vocab_size_divisible_by)
        else:
            out = export_checkpoint(args.megatron_path, args.hf_path, fmt=args.format, iteration=args.iteration,
                                    dtype=args.dtype, max_shard_bytes=args.max_shard_size_mb * 1024 ** 2)
    except ConversionError as e:
        print(f"dms-convert {args.verb}: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"dms-convert {args.verb}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``dms-convert``: Hugging Face <-> megatron checkpoints (verbs and flags after Megatron-Bridge's converter).

    dms-convert import --hf-model DIR --megatron-path DIR [--tp N --pp N] [--dtype float32]
    dms-convert export --megatron-path DIR --hf-path DIR [--format dms|plain] [--iteration N] [--dtype ...]
                       [--modeling-code DIR]      (the official Qwen3-DMS modeling files, for trust_remote_code)

With --tp/--pp > 1 and no torchrun environment, import checks everything first, then relaunches itself under
torchrun with tp*pp processes; each rank reads only the HF tensors it holds (megatron dist-checkpoints are
reshardable: any layout loads them). Exit status: 0 written, 2 bad input (one ``error:`` line, nothing written).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from dms_megatron.config import BAD_INPUT_EXIT_CODE
from dms_megatron.convert.hf_io import DTYPES, ConversionError
from dms_megatron.convert.hf_model import DEFAULT_DIVISIBLE_BY
from dms_megatron.convert.workflows import check_import, export_checkpoint, import_checkpoint


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
    exp.add_argument("--megatron-path", required=True, help="checkpoint directory (with latest_checkpointed_iteration) or a dms-refit run "
                                                          "directory (its checkpoints/)")
    exp.add_argument("--hf-path", required=True, help="output HF directory (must not exist or be empty)")
    exp.add_argument("--format", default="dms", choices=["dms", "plain"],
                     help="dms: official DMS config keys (+ adapter tensors); plain: stock transformers model")
    exp.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    exp.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                     help="HF tensor dtype (default: the original HF dtype, else float32)")
    exp.add_argument("--max-shard-size-mb", type=int, default=5 * 1024)
    exp.add_argument("--modeling-code", type=Path, default=None,
                     help="directory with the modeling files the DMS export's auto_map names (the official "
                          "Qwen3-DMS configuration_qwen3_dms.py + modeling_qwen3_dms.py); copied into the export")
    return p


def _relaunch_under_torchrun(world: int, argv) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "dms_megatron.launch.convert", *argv]
    return subprocess.call(cmd)


def _run(args, argv) -> object:
    if args.verb == "import":
        kw = dict(tp=args.tp, pp=args.pp, dtype=args.dtype, divisible_by=args.make_vocab_size_divisible_by)
        if args.tp * args.pp > 1 and "WORLD_SIZE" not in os.environ:
            check_import(args.hf_model, args.megatron_path, **kw)  # every check before any process starts
            return _relaunch_under_torchrun(args.tp * args.pp, argv)
        return import_checkpoint(args.hf_model, args.megatron_path, **kw)
    return export_checkpoint(args.megatron_path, args.hf_path, fmt=args.format, iteration=args.iteration,
                             dtype=args.dtype, max_shard_bytes=args.max_shard_size_mb * 1024 ** 2,
                             modeling_code=args.modeling_code)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        out = _run(args, argv)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    if isinstance(out, int):  # the torchrun relaunch's exit status
        return out
    if os.environ.get("RANK", "0") == "0":
        print(f"dms-convert {args.verb}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

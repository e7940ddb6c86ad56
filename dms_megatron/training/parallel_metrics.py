"""Step metrics gathered over pipeline / tensor / data-parallel ranks, and the end-of-run report of a
model-parallel run (evaluated on one rank from the final checkpoint, resharded to tp = pp = 1).

  python -m dms_megatron.training.parallel_metrics --run-dir DIR     (single process; reads DIR/config.yaml)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LOSS_KEYS = ("loss", "kd_loss", "compression_loss", "evicted_fraction")


def step_metrics(reduced: list, layer_fracs: torch.Tensor, tp: int) -> dict:
    """One optimizer step's metrics on every rank of a model-parallel group.

    reduced: the loss function's per-micro-batch dicts (only the last pipeline stage has them);
    layer_fracs: float64 [num_layers], this rank's micro-batch mean evicted fraction per layer (its KV heads, its
    stage's layers; zeros elsewhere). Returns the losses (mean over micro batches) and evicted_fraction/layer{k}
    (mean over all KV heads), equal on all tp x pp ranks.
    """
    from megatron.core import parallel_state

    v = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
    if reduced:
        for i, k in enumerate(LOSS_KEYS):
            v[i] = sum(float(r[k]) for r in reduced) / len(reduced)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(v, group=parallel_state.get_pipeline_model_parallel_group())
    fr = layer_fracs.clone()
    if parallel_state.get_model_parallel_group() is not None and dist.is_initialized() and (
            tp * parallel_state.get_pipeline_model_parallel_world_size() > 1):
        dist.all_reduce(fr, group=parallel_state.get_model_parallel_group())
    fr /= tp
    out = dict(zip(LOSS_KEYS, v.tolist()))
    out.update({f"evicted_fraction/layer{i + 1}": float(x) for i, x in enumerate(fr)})
    return out


class _History:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def history(self) -> list:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def report_from_checkpoint(cfg, run_dir: Path) -> dict:
    """Run ``main`` in a fresh single process (outside this job's process groups); returns report.json."""
    from dms_megatron.megatron.distributed import single_process_env

    env = single_process_env()
    rc = subprocess.call([sys.executable, "-m", "dms_megatron.training.parallel_metrics", "--run-dir", str(run_dir)],
                         env=env)
    if rc:
        raise RuntimeError(f"end-of-run evaluation of {run_dir} failed (exit {rc}); rerun it with: python -m "
                           f"dms_megatron.training.parallel_metrics --run-dir {run_dir}")
    return json.loads((Path(run_dir) / "report.json").read_text())


def main(argv=None) -> int:
    import yaml

    from dms_megatron.megatron.distributed import init_process_groups
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.megatron.runtime import DMSRuntime
    from dms_megatron.training.checkpointing import load_model_weights
    from dms_megatron.training.config import RefitConfig
    from dms_megatron.training.loop import Resolved, build_datasets
    from dms_megatron.training.report import write_report

    ap = argparse.ArgumentParser(description="end-of-run report of a re-fit, evaluated on one rank")
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    d = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    d["parallel"] = dict(d.get("parallel") or {}, tp=1, pp=1, sequence_parallel=False, nproc_per_node=None)
    cfg = RefitConfig.from_dict(d)
    init_process_groups(1, 1, seed=cfg.train.seed)
    res = Resolved(cfg)
    mc, seq = res.model_config, cfg.train.seq_length
    teacher = build_gpt_model(mc, None, seq_length=seq)
    load_model_weights(res.init_checkpoint, teacher)
    teacher.eval()
    student = build_gpt_model(mc, cfg.dms, seq_length=seq)
    load_model_weights(args.run_dir / "checkpoints", student)
    _, valid_ds = build_datasets(cfg, res, args.run_dir)
    write_report(args.run_dir, cfg, res, student, teacher, valid_ds, _History(args.run_dir), DMSRuntime)
    return 0


if __name__ == "__main__":
    sys.exit(main())

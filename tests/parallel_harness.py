"""One rank of a re-fit for the parallel-equivalence tests, with the student's reduced gradients of every step saved
as a dist checkpoint (so a one-rank process can load them resharded to tp = pp = 1).

  torchrun --nproc-per-node N tests/parallel_harness.py --config CFG.json --run-dir DIR [--dump OUT.pt]
  torchrun --nproc-per-node N tests/parallel_harness.py --config CFG.json --load CKPT_DIR OUT.pt [--load ...]

The second form builds the student, its DDP wrapper and optimizer at the config's layout, loads each checkpoint
(model + optimizer, strict) and saves this rank's local shards (weights and Adam moments, with their tensor-parallel
partition dim and global layer numbers) to OUT.pt with a ".rank{r}" suffix, for an independent merge in the test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def grads_dir(run_dir) -> Path:
    return Path(run_dir) / "grads"


def dump_grads(run_dir):
    """An ``after_backward`` hook: save the student's gradients (megatron DDP's main_grad) at the student's own
    checkpoint keys, as iteration ``step`` (1-based) under run_dir/grads."""
    from dms_megatron.checkpoint import save_checkpoint

    def hook(step, ddp):
        student = ddp.module.student
        swapped = []
        for p in student.parameters():
            if p.requires_grad:
                swapped.append((p, p.data))
                p.data = p.main_grad.detach().view_as(p).clone()
        try:
            save_checkpoint(grads_dir(run_dir), step, student)
        finally:
            for p, data in swapped:
                p.data = data

    return hook


def _moments(optimizer, p) -> dict:
    """Adam's exp_avg / exp_avg_sq of model parameter ``p`` (None before the first step). A plain optimizer holds
    them whole; the distributed optimizer holds this data-parallel rank's range of the flattened parameter: the
    tensors come back whole-shaped with that range filled in and NaN elsewhere (the replicas' dumps together cover
    them)."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "model_param_gbuf_map"):  # a plain (fp32) optimizer: state keyed by the parameter
            st = opt.optimizer.state.get(p, {})
            return {k: st.get(k) for k in ("exp_avg", "exp_avg_sq")}
        if p not in opt.model_param_gbuf_map:  # none of p is in this rank's range
            return {k: torch.full_like(p, float("nan")) for k in ("exp_avg", "exp_avg_sq")}
        r = opt._get_model_param_range_map(p)["param"]
        group, order = opt.model_param_group_index_map[p]
        st = opt.optimizer.state.get(opt.optimizer.param_groups[group]["params"][order], {})
        out = {}
        for k in ("exp_avg", "exp_avg_sq"):
            full = torch.full((p.numel(),), float("nan"))
            full[r.start:r.end] = st[k]
            out[k] = full.view_as(p)
        return out
    raise AssertionError(f"no optimizer holds {tuple(p.shape)}")


def local_shards(module, optimizer, num_layers: int) -> dict:
    """{global name: {"w": weight, "exp_avg": ..., "exp_avg_sq": ..., "tp_dim": int or None}} of ``module`` (the
    student) on this rank."""
    import re

    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    offset = parallel_state.get_pipeline_model_parallel_rank() * (num_layers // pp)
    out = {}
    for name, p in module.named_parameters():
        name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
        out[name] = {"w": p.detach().clone(), **_moments(optimizer, p),
                     "tp_dim": p.partition_dim if getattr(p, "tensor_model_parallel", False) else None}
    return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(), "tensors": out}


def load_and_dump(cfg, loads) -> None:
    import torch
    import torch.distributed as dist

    from dms_megatron.megatron.distributed import init_process_groups
    from dms_megatron.megatron.model import build_gpt_model, transformer_config
    from dms_megatron.checkpoint import load_checkpoint
    from dms_megatron.training.optim import build_optimizer, build_scheduler, wrap_ddp

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    init_process_groups(tp, pp, seed=cfg.train.seed)
    for ckpt, out in loads:
        student = build_gpt_model(cfg.model, cfg.dms, seq_length=cfg.train.seq_length,
                                  config=transformer_config(cfg.model, tp=tp, pp=pp))
        ddp = wrap_ddp(student, cfg.train.distributed_optimizer)
        optimizer = build_optimizer(ddp, cfg.train)
        load_checkpoint(ckpt, ddp, optimizer, build_scheduler(optimizer, cfg.train))
        torch.save(local_shards(ddp.module, optimizer, cfg.model.num_layers), f"{out}.rank{dist.get_rank()}")


def main(argv=None) -> int:
    import torch
    import torch.distributed as dist

    from dms_megatron.config import RefitConfig
    from dms_megatron.megatron.distributed import destroy_process_groups
    from refit_fixtures import refit_trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--load", nargs=2, action="append", metavar=("CKPT_DIR", "OUT"))
    ap.add_argument("--report", action="store_true", help="also run the report stage (report.json)")
    ap.add_argument("--no-grads", action="store_true", help="do not save each step's gradients")
    ap.add_argument("--dump", type=Path, help="after the run, save this rank's local shards (as --load) to DUMP")
    args = ap.parse_args(argv)
    cfg = RefitConfig.from_dict(json.loads(args.config.read_text()))
    if args.load:
        load_and_dump(cfg, args.load)
    else:
        trainer = refit_trainer(cfg, args.run_dir,
                                after_backward=None if args.no_grads else dump_grads(args.run_dir))
        trainer.run(report=args.report)
        if args.dump:
            shards = local_shards(trainer.ddp.module.student, trainer.optimizer, cfg.model.num_layers)
            torch.save(shards, f"{args.dump}.rank{dist.get_rank()}")
    destroy_process_groups()  # as the worker does (training.entry): not left to interpreter shutdown
    return 0


if __name__ == "__main__":
    sys.exit(main())

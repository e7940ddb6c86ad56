#!/usr/bin/env python
"""Where a re-fitted student's compression ratio departs from its target: its CR on the re-fit's training split
(Gumbel-noised decisions as in training, and hard ones), on the validation samples ``report.json`` uses, and on the
held-out text sequences of ``dms-eval`` (hard decisions), each split into recall documents and plain text.

  python tools/cr_sources.py RUN_DIR [--iteration N] [--samples 64]

RUN_DIR: a ``dms-refit`` run dir of the embedded teacher (config.yaml + checkpoints/). CR here is 1 / (1 - mean
evicted fraction of the samples), the fraction over layers, KV heads and valid positions, as the trainer logs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from dms_megatron.checkpoint import load_model_weights
from dms_megatron.config import RefitConfig
from dms_megatron.core.compression import cr_from_evicted_fraction
from dms_megatron.core.losses import cr_at_step
from dms_megatron.data.embedded import heldout_file, read_heldout_text
from dms_megatron.data.indexed import collate
from dms_megatron.data.tokenizer import load_tokenizer
from dms_megatron.megatron.distributed import destroy_process_groups, init_process_groups
from dms_megatron.megatron.model import build_gpt_model
from dms_megatron.megatron.runtime import DMSRuntime, dms_forward
from dms_megatron.training.inputs import RunInputs

TEXT_SEQUENCES = 8  # dms-eval's held-out text sequences


def fractions(student, tokens, valid, mode: str, seed: int, step: int) -> torch.Tensor:
    """[b] evicted fraction per sample, mean over layers ("train": noise keyed as in training at ``step``)."""
    rt = DMSRuntime(mode=mode, seed=seed, step=step, sample_ids=torch.arange(tokens.shape[0]), valid=valid,
                    record_flags=False)
    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with dms_forward(student, rt):
        student(tokens, pos, None)
    return sum(rt.fractions.values()) / len(rt.fractions)


def cr(frac: torch.Tensor) -> float:
    return cr_from_evicted_fraction(float(frac.mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    ap.add_argument("--samples", type=int, default=64, help="samples of each split")
    args = ap.parse_args()
    cfg = RefitConfig.from_dict(yaml.safe_load((args.run_dir / "config.yaml").read_text()))
    init_process_groups(1, 1, seed=cfg.train.seed)
    torch.set_grad_enabled(False)
    try:
        inputs = RunInputs.resolve(cfg, build=True)
        student = build_gpt_model(inputs.model_config, cfg.dms, seq_length=cfg.train.seq_length)
        load_model_weights(args.run_dir / "checkpoints", student, iteration=args.iteration)
        student.eval()
        kv = load_tokenizer(inputs.init).convert_tokens_to_ids("<|kv|>")
        train_ds, valid_ds = inputs.datasets(cfg, args.run_dir)
        step = args.iteration if args.iteration is not None else cfg.train.steps
        sets = []
        for name, ds in (("training split", train_ds), ("validation split", valid_ds)):
            b = collate([ds[i] for i in range(min(args.samples, len(ds)))])
            sets.append((name, b["tokens"], (b["loss_mask"] > 0) | (b["tokens"] == inputs.eos_id)))
        text = torch.tensor(read_heldout_text(heldout_file(inputs.init, "text"), TEXT_SEQUENCES,
                                              cfg.train.seq_length))
        sets.append(("held-out text", text, torch.ones_like(text, dtype=torch.bool)))
        d = cfg.dms
        target = cr_at_step(max(step - 1, 0), d.initial_cr, d.final_cr, d.final_step)  # that of step's update
        print(f"after {step} steps: target CR {target:.2f}")
        for name, tokens, valid in sets:
            noisy = fractions(student, tokens, valid, "train", cfg.train.seed, step)
            hard = fractions(student, tokens, valid, "hard", cfg.train.seed, step)
            rec = (tokens == kv).any(-1)
            parts = ", ".join(f"{lab} ({int(m.sum())}) {cr(noisy[m]):.2f} / {cr(hard[m]):.2f}"
                              for lab, m in (("recall docs", rec), ("text", ~rec)) if m.any())
            print(f"{name}: CR noisy / hard {cr(noisy):.2f} / {cr(hard):.2f}; {parts}")
    finally:
        destroy_process_groups()


if __name__ == "__main__":
    main()

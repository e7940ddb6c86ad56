"""Re-fit step time vs a plain fine-tune step of the same model on CPU, measured in one run (read the ratio).

  python benchmarks/refit_step.py [--quick] [--reps N]

The embedded tiny model (4 layers, hidden 192, 8 x 256 tokens, fp32, dense DMS backend), through the same
measurement as the GPU benchmark's model steps (``model_steps.py``): plain = stock model, cross-entropy, forward +
backward + megatron optimizer step; refit = frozen teacher forward + DMS student forward (Gumbel-sigmoid soft bias)
+ KL + compression loss, backward, optimizer step. Steps alternate and the medians are compared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dms_megatron.config import TINY_TEACHER  # noqa: E402
from dms_megatron.megatron.distributed import init_process_groups  # noqa: E402
from model_steps import StepSetup, measure  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args(argv)
    init_process_groups()
    seq = 128 if args.quick else 256
    setup = StepSetup(TINY_TEACHER, seq=seq, micro_batch=8, precision="fp32", window=16)
    out = measure(setup, torch.device("cpu"), reps=2 if args.quick else args.reps, warmup=1)
    print(f"model: {setup.model.num_layers} layers, hidden {setup.model.hidden_size}, batch {setup.micro_batch} x "
          f"{seq} tokens, threads {torch.get_num_threads()}")
    print(f"plain fine-tune step {out['plain']['ms']:.0f} ms | DMS re-fit step {out['refit']['ms']:.0f} ms | "
          f"ratio {out['refit_over_plain']:.2f}")


if __name__ == "__main__":
    main()

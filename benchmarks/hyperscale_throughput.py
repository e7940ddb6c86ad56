"""Decode throughput of W parallel chains at equal peak KV memory: the vanilla teacher vs its DMS students (CR 4, 8).

The memory budget is what the teacher's ``--width`` chains hold at their peak after the shared chained-recall
prompts; each student runs as many chains as fit in that budget (from its own measured peak per chain, one probe
run). Every method then generates ``--tokens`` tokens per chain (no early stop) from the same held-out prompts, one
batched decode step per token, and the decode tokens/s are compared in one run (ratios to the teacher's).

  python benchmarks/hyperscale_throughput.py                     # students from dms-eval's cache (CR 4 and 8)
  python benchmarks/hyperscale_throughput.py --width 2 --questions 8 --student 4=runs/refit/X --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dms_megatron.config import TINY_TEACHER, RefitConfig
from dms_megatron.data.embedded import heldout_file
from dms_megatron.data.recall import read_items
from dms_megatron.eval.chains import sample_widths
from dms_megatron.eval.config import EvalConfig, cr_key
from dms_megatron.eval.run import ensure_student, resolve_assets
from dms_megatron.inference.engine import Engine
from dms_megatron.inference.loading import checkpoints_dir, load_model
from dms_megatron.inference.press import make_press

NO_STOP = {-1}  # no token stops a chain: every chain generates exactly --tokens tokens


def _peak_per_chain(engine: Engine, prompts, tokens: int) -> float:
    run = sample_widths(engine, prompts, [1], tokens, 1.0, NO_STOP, seed=0)[1]
    return float(run.resident.max(dim=-1).values.float().mean())


def _throughput(engine: Engine, prompts, width: int, tokens: int, seed: int) -> dict:
    run = sample_widths(engine, prompts, [width], tokens, 1.0, NO_STOP, seed)[width]
    steps = tokens - 1
    seconds = sum(run.step_seconds)
    peak = float(run.resident.sum(dim=1).max(dim=-1).values.float().mean())  # per question, its W chains
    return {"width": width, "decode_tokens": len(prompts) * width * steps, "decode_s": seconds,
            "tokens_per_s": len(prompts) * width * steps / seconds, "peak_tokens_per_question": peak}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=4, help="the teacher's chains per question (sets the budget)")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per chain")
    p.add_argument("--crs", type=float, nargs="+", default=[4.0, 8.0])
    p.add_argument("--student", action="append", default=[], metavar="CR=RUN",
                   help="a student run dir per CR (default: dms-eval's cached students, re-fitted if missing)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = EvalConfig(refit=RefitConfig(TINY_TEACHER), crs=a.crs)  # dms-eval's default students
    assets = resolve_assets(cfg)
    given = dict(s.split("=", 1) for s in a.student)
    teacher = load_model(assets.teacher)
    items = read_items(heldout_file(assets.teacher, "chain"), a.questions)
    prompts = [it["ids"][:it["answers"][0]] for it in items]
    vanilla = _throughput(Engine(teacher), prompts, a.width, a.tokens, seed=1)
    budget = vanilla["peak_tokens_per_question"]
    rows = {"vanilla": vanilla}
    for cr in a.crs:
        key = cr_key(cr)
        path = checkpoints_dir(given[key]) if key in given else ensure_student(cfg, cr, assets, None)
        student = load_model(path, require_dms=True)
        engine = Engine(student, make_press("dms", window=student.dms.window))
        width = max(1, int(budget // _peak_per_chain(engine, prompts, a.tokens)))
        rows[f"dms@{key}"] = _throughput(engine, prompts, width, a.tokens, seed=1)
    for name, r in rows.items():
        r["throughput_vs_vanilla"] = r["tokens_per_s"] / vanilla["tokens_per_s"]
        print(f"{name:>8}: W={r['width']:3d} chains/question, peak {r['peak_tokens_per_question']:8.0f} tokens "
              f"(budget {budget:.0f}), {r['tokens_per_s']:8.1f} tokens/s = {r['throughput_vs_vanilla']:.2f}x "
              f"vanilla", flush=True)
    out = {"budget_peak_tokens": budget, "questions": len(prompts), "tokens_per_chain": a.tokens,
           "threads": torch.get_num_threads(), "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()

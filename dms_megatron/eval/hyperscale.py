"""``run_hyperscale``: accuracy of W sampled chains within a length budget L, against memory, KV reads and modeled
latency, for the vanilla teacher, its DMS students and the training-free baselines (the paper's hyper-scaling).

hyperscale.json:
  methods: {name: {"method", "cr", "budget", "rows": [{length, width, accuracy, pass_at_w, answered, peak_tokens,
            kv_reads, latency_s, wall_s}]}} with names "vanilla", "dms@4", "tova@4", ... (baselines at CR c run on
            the teacher with the budget the CR-c student reached on these questions: TOVA, H2O and StreamingLLM at
            its per-(layer, KV head) peak, Quest, which keeps the whole cache, at its reads per decode step);
  frontiers: {axis: {"budgets": [...], name or method family: [best accuracy at or under each budget]}};
  claims: ``claims`` below; config, items, seconds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List

from dms_megatron.config import ConfigError
from dms_megatron.data.embedded import heldout_file
from dms_megatron.data.recall import read_items
from dms_megatron.data.tokenizer import EOS, NUM_VALUES, load_tokenizer
from dms_megatron.eval.budget import families, first_budget, frontier
from dms_megatron.eval.chains import grid_rows, sample_widths
from dms_megatron.eval.config import HyperscaleConfig, cr_key
from dms_megatron.eval.harness import budget_for
from dms_megatron.eval.plots import frontier_plots
from dms_megatron.eval.run import Progress, ensure_student, resolve_assets
from dms_megatron.inference.engine import Engine
from dms_megatron.inference.loading import load_model
from dms_megatron.inference.press import make_press

AXES = ("peak_tokens", "kv_reads", "latency_s")
BASELINES = ("tova", "h2o", "streamingllm", "quest")


def chain_items(cfg: HyperscaleConfig, teacher: Path) -> List[dict]:
    """The held-out chained-recall questions: prompt (up to the start key) of one length for all, hops, answer."""
    path = Path(cfg.items_file) if cfg.items_file else heldout_file(teacher, "chain")
    if not cfg.items_file and not path.is_file():
        raise ConfigError(f"the teacher {teacher} ships no chained-recall questions ({path}): it predates the task; "
                          f"rebuild it with tools/build_tiny_teacher.py or give hyperscale.items_file")
    items = read_items(path, cfg.items)
    prompts = {it["answers"][0] for it in items}
    if len(prompts) != 1:
        raise ConfigError(f"{path}: chained-recall prompts must all end at one position (found {sorted(prompts)})")
    return items


def stop_tokens(tokenizer: Path) -> tuple:
    """(value symbols: the answers a chain can give, value symbols + EOS: where a chain ends)."""
    tok = load_tokenizer(tokenizer)
    values = set(tok.convert_tokens_to_ids([f"<|v{i}|>" for i in range(NUM_VALUES)]))
    if tok.unk_token_id in values or None in values:
        raise ConfigError(f"tokenizer at {tokenizer} lacks the value symbols <|v0|>..: not a chained-recall teacher")
    return values, values | {tok.convert_tokens_to_ids(EOS)}


def _method_runs(cfg: HyperscaleConfig, teacher, students: Dict[str, Path]):
    """(name, method, cr, engine factory) for each method; a baseline's engine needs the DMS student's row."""
    c = teacher.cfg
    yield "vanilla", "vanilla", 1.0, lambda rows: Engine(teacher)
    for cr in cfg.eval.crs:
        key = cr_key(cr)
        student = load_model(students[key], require_dms=True)
        yield f"dms@{key}", "dms", cr, lambda rows, s=student: Engine(s, make_press("dms", window=s.dms.window))
        for name in (m for m in BASELINES if m in cfg.eval.methods):
            def engine(dms_rows, name=name):
                w1 = max((r for r in dms_rows if r["width"] == 1), key=lambda r: r["length"])
                if name == "quest":  # the student's reads per chain and decode step, per layer and KV head
                    per_step = w1["kv_reads"] / max(1.0, w1["chain_steps"])
                    budget = max(1, math.ceil(per_step / (c.num_layers * c.num_query_groups) - 1e-9))
                else:
                    budget = budget_for(w1["peak_tokens"], c.num_layers, c.num_query_groups)
                return Engine(teacher, make_press(name, budget=budget, settings=cfg.eval.press))
            yield f"{name}@{key}", name, cr, engine


def run_hyperscale(cfg: HyperscaleConfig, run_dir: Path, log=print) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    assets = resolve_assets(cfg.eval)
    students = {cr_key(c): ensure_student(cfg.eval, c, assets, run_dir, log) for c in cfg.eval.crs}
    teacher = load_model(assets.teacher)
    items = chain_items(cfg, assets.teacher)
    answers, stop = stop_tokens(Path(cfg.eval.refit.data.tokenizer or assets.teacher))
    prompts = [it["ids"][:it["answers"][0]] for it in items]
    truths = [it["ids"][it["answers"][-1]] for it in items]
    methods = [m for m in _method_runs(cfg, teacher, students) if m[1] in cfg.eval.methods]
    progress = Progress(len(methods), log)
    results: Dict[str, dict] = {}
    for name, method, cr, make in methods:
        engine = make(results.get(f"dms@{cr_key(cr)}", {}).get("rows", []))
        runs = sample_widths(engine, prompts, cfg.widths, max(cfg.lengths), cfg.temperature, stop, cfg.seed)
        rows = grid_rows(runs, truths, cfg.lengths, answers, teacher.cfg, cfg.hardware)
        results[name] = {"method": method, "cr": cr, "budget": getattr(engine.press, "budget", None), "rows": rows}
        best = max(rows, key=lambda r: r["accuracy"])
        progress.step(f"{name}: best accuracy {best['accuracy']:.3f} at L={best['length']} W={best['width']} "
                      f"(peak {best['peak_tokens']:.0f} tokens)")
    out = {"methods": results, "frontiers": frontiers(results), "items": len(items),
           "config": cfg.to_dict(), "seconds": round(time.time() - progress.t0, 1)}
    out["claims"] = claims(results)
    (run_dir / "hyperscale.json").write_text(json.dumps(out, indent=2))
    frontier_plots(out, run_dir)
    log(f"wrote {run_dir / 'hyperscale.json'} and the frontier plots in {out['seconds']:.0f} s")
    return out


def _points(entry: dict, axis: str):
    return [(r[axis], r["accuracy"]) for r in entry["rows"]]


def frontiers(results: Dict[str, dict], count: int = 24) -> dict:
    """Per axis: ``count`` log-spaced budgets over the measured range and each family's frontier at them."""
    out = {}
    for axis in AXES:
        xs = [r[axis] for e in results.values() for r in e["rows"] if r[axis] > 0]
        lo, hi = min(xs), max(xs)
        budgets = [lo * (hi / lo) ** (i / (count - 1)) for i in range(count)] if hi > lo else [lo]
        out[axis] = {"budgets": budgets, **{f: frontier([p for e in es for p in _points(e, axis)], budgets)
                                            for f, es in families(results).items()}}
    return out


def _margins(at: Dict[str, float], dms: str) -> dict:
    others = {k: v for k, v in at.items() if k != dms and not k.startswith("dms@")}
    return {f"over_{k}": round(100 * (at[dms] - v), 1) for k, v in others.items()}


def claims(results: Dict[str, dict]) -> dict:
    """Per axis: at 3 budgets log-spread over the teacher's unsaturated range (from its cheapest point to the
    cheapest point where it reaches its best accuracy), the frontier of the teacher, of each DMS student and of the
    best training-free method (no point at or under a budget: accuracy 0, the method cannot run there), the DMS
    students' margins in accuracy points, and the budget ratio at which each student reaches the teacher's best
    accuracy (teacher's budget / student's; None: never)."""
    fam = families(results)
    dms = sorted(f for f in fam if f.startswith("dms@"))
    base = [f for f in fam if f in BASELINES]
    out = {}
    for axis in AXES:
        pts = {f: [p for e in es for p in _points(e, axis)] for f, es in fam.items()}
        best = max(a for _, a in pts["vanilla"])
        lo, hi = min(c for c, _ in pts["vanilla"]), first_budget(pts["vanilla"], best)
        budgets = [lo, math.sqrt(lo * hi), hi] if hi > lo else [lo]
        rows = []
        for b in budgets:
            at = {f: (frontier(pts[f], [b])[0] or 0.0) for f in ["vanilla"] + dms}
            if base:
                at["training_free"] = max(frontier(pts[f], [b])[0] or 0.0 for f in base)
            rows.append({"budget": b, "accuracy": at, **{f"margin_{d}": _margins(at, d) for d in dms}})
        reach = {d: first_budget(pts[d], best) for d in dms}
        out[axis] = {"teacher_best": best, "teacher_budget_at_best": hi, "at": rows,
                     "budget_ratio_to_teacher_best": {d: (hi / r if r else None) for d, r in reach.items()}}
    return out


__all__ = ["run_hyperscale", "claims", "frontiers", "chain_items", "stop_tokens", "AXES"]

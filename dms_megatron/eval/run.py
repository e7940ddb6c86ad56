"""``run_eval``: re-fit (or reuse) the students, evaluate every method per CR, write eval.json and Pareto plots.

eval.json: {method: {cr: {recall_acc, kl, peak_tokens, kv_reads, ...}}} with method keys vanilla, dms, tova, h2o,
streamingllm, quest. vanilla (the teacher with its full cache) sits under cr "1"; every baseline at CR c runs on the
teacher with the per-head budget matched to the peak tokens the CR-c DMS student reached on the same task.
``peak_tokens`` / ``kv_reads`` are the recall task's (mean per question); ``kl_peak_tokens`` / ``kl_kv_reads`` those
of the held-out text the KL is measured on. Recall rows also carry ``answer_resident`` (per layer, the fraction of
questions x KV heads whose cache still holds the stated answer when the question ends) and ``recall_acc_by_layer0``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import yaml

from dms_megatron.config import ConfigError
from dms_megatron.eval.config import EvalConfig, cr_key
from dms_megatron.eval.harness import budget_for, kl_metrics, recall_metrics, teacher_logits
from dms_megatron.inference.engine import Engine
from dms_megatron.inference.press import make_press


@dataclass
class EvalAssets:
    teacher: Path
    recall_eval: Optional[Path]
    valid_prefix: str
    seq_length: int
    version: str  # what the students' cache key depends on besides their config


def resolve_assets(cfg: EvalConfig) -> EvalAssets:
    r = cfg.refit
    if r.embedded:
        from dms_megatron.data.embedded import VERSION, ensure_tiny_teacher

        a = ensure_tiny_teacher()
        teacher, recall, valid, version = a.teacher_checkpoint, a.recall_eval, a.valid_prefix, VERSION
    else:
        teacher, recall, valid = Path(r.train.init_checkpoint), r.data.recall_eval, r.data.valid_prefix
        version = str(Path(teacher).resolve())
    teacher = Path(cfg.teacher) if cfg.teacher else Path(teacher)
    recall = cfg.recall_eval or recall
    valid = cfg.valid_prefix or valid
    for what, p in (("teacher checkpoint", teacher), ("recall questions", recall)):
        if p is not None and not Path(p).exists():
            raise ConfigError(f"{what} {p} does not exist")
    return EvalAssets(teacher, Path(recall) if recall else None, str(valid), r.train.seq_length, version)


def _checkpoints(path: Path) -> Path:
    """A dms-refit run dir or its checkpoints/ dir -> the checkpoints dir."""
    path = Path(path)
    if (path / "checkpoints" / "latest_checkpointed_iteration.txt").is_file():
        return path / "checkpoints"
    if (path / "latest_checkpointed_iteration.txt").is_file():
        return path
    raise ConfigError(f"student {path} holds no checkpoint (no latest_checkpointed_iteration.txt in it or in its "
                      f"checkpoints/): pass a dms-refit run dir")


def ensure_student(cfg: EvalConfig, cr: float, assets: EvalAssets, run_dir: Path) -> Path:
    """The checkpoints dir of the student for ``cr``: given in cfg.students, cached, or re-fitted now."""
    from dms_megatron.data.embedded import cache_root
    from dms_megatron.training.config import RefitConfig

    key = cr_key(cr)
    if key in cfg.students:
        return _checkpoints(Path(cfg.students[key]))
    d = cfg.refit.to_dict()
    d["dms"]["final_cr"] = float(cr)
    rc = RefitConfig.from_dict(d)
    world = rc.parallel.nproc_per_node or rc.parallel.tp * rc.parallel.pp
    if world != 1:
        raise ConfigError(f"dms-eval re-fits students with one rank (refit.parallel asks for {world}); re-fit them "
                          f"with dms-refit and pass +students.{key}=RUN_DIR")
    digest = hashlib.sha256(json.dumps([assets.version, rc.to_dict()], sort_keys=True).encode()).hexdigest()[:12]
    root = (cache_root() / "students" if cfg.reuse_students else run_dir / "students") / f"cr{key}-{digest}"
    if (root / "report.json").is_file():
        print(f"[dms-eval] student CR {key}: reusing {root}", flush=True)
        return root / "checkpoints"
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.yaml").write_text(yaml.safe_dump(rc.to_dict(), sort_keys=False))
    print(f"[dms-eval] student CR {key}: re-fitting into {root}", flush=True)
    rc_code = subprocess.call([sys.executable, "-m", "dms_megatron.training.worker", "--run-dir", str(tmp)])
    if rc_code:
        raise RuntimeError(f"re-fitting the CR {key} student failed (exit {rc_code}); its run dir {tmp} is kept "
                           f"for inspection")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root / "checkpoints"


def heldout_sequences(prefix: str, count: int, length: int) -> torch.Tensor:
    """[count, length]: the first ``count`` documents of an indexed dataset with at least ``length`` tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not Path(prefix + ".idx").is_file():
        raise ConfigError(f"held-out data {prefix}.idx does not exist")
    ds = IndexedDataset(prefix)
    out = []
    for i in range(len(ds)):
        doc = ds[i]
        if len(doc) >= length:
            out.append(torch.as_tensor(doc[:length].astype("int64")))
            if len(out) == count:
                return torch.stack(out)
    raise ConfigError(f"{prefix} has {len(out)} documents of >= {length} tokens; eval.kl_sequences={count} asked "
                      f"for more (lower eval.kl_sequences or eval.kl_length)")


def _metrics(engine: Engine, items, seqs, t_logits, kl_engine: Optional[Engine] = None) -> dict:
    """Recall metrics of ``engine`` and KL metrics of ``kl_engine`` (default the same engine) in one row."""
    rec = recall_metrics(engine, items) if items else {}
    kl = kl_metrics(kl_engine or engine, seqs, t_logits)
    return {**rec, "kl": kl["kl"], "kl_peak_tokens": kl["peak_tokens"], "kl_kv_reads": kl["kv_reads"]}


def _budget_press(name: str, cfg: EvalConfig, budget: int):
    kw = {"streamingllm": {"sinks": min(cfg.streamingllm_sinks, budget - 1)},
          "quest": {"page": min(cfg.quest_page, budget)}}.get(name, {})
    return make_press(name, budget=budget, **kw)


def run_eval(cfg: EvalConfig, run_dir: Path) -> dict:
    from dms_megatron.data.recall import read_eval
    from dms_megatron.eval.plots import pareto_plots
    from dms_megatron.inference.loading import load_megatron

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    assets = resolve_assets(cfg)
    students = {cr_key(c): ensure_student(cfg, c, assets, run_dir) for c in cfg.crs}
    teacher = load_megatron(assets.teacher)
    items = read_eval(assets.recall_eval, cfg.recall_limit) if assets.recall_eval else []
    seqs = heldout_sequences(assets.valid_prefix, cfg.kl_sequences, cfg.kl_length or assets.seq_length)
    t_logits = teacher_logits(Engine(teacher), seqs)
    layers, ng = teacher.cfg.num_layers, teacher.cfg.num_query_groups

    results: Dict[str, Dict[str, dict]] = {m: {} for m in cfg.methods}
    if "vanilla" in results:
        results["vanilla"]["1"] = _metrics(Engine(teacher), items, seqs, t_logits)
    baselines = [m for m in cfg.methods if m not in ("vanilla", "dms")]
    for c in cfg.crs:
        key = cr_key(c)
        student = load_megatron(students[key], require_dms=True)
        dms = _metrics(Engine(student, make_press("dms", window=student.dms.window)), items, seqs, t_logits)
        dms["student"] = str(students[key])
        if "dms" in results:
            results["dms"][key] = dms
        # the recall and KL tasks have different lengths, so each gets the budget DMS reached on it
        b_rec = budget_for(dms.get("peak_tokens", dms["kl_peak_tokens"]), layers, ng)
        b_kl = budget_for(dms["kl_peak_tokens"], layers, ng)
        for name in baselines:
            results[name][key] = dict(_metrics(Engine(teacher, _budget_press(name, cfg, b_rec)), items, seqs,
                                               t_logits, Engine(teacher, _budget_press(name, cfg, b_kl))),
                                      budget=b_rec, kl_budget=b_kl)
        print(f"[dms-eval] CR {key}: " + ", ".join(
            f"{m} recall={results[m][key].get('recall_acc', float('nan')):.3f} kl={results[m][key]['kl']:.4f}"
            for m in results if key in results[m]), flush=True)
        if "answer_resident" in dms:
            print(f"[dms-eval] CR {key}: dms holds the stated answer per layer {dms['answer_resident']}; recall when "
                  f"layer 0 holds it / dropped it: {dms['recall_acc_by_layer0']}", flush=True)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    pareto_plots(results, run_dir)
    print(f"[dms-eval] wrote {run_dir / 'eval.json'} and Pareto plots in {time.time() - t0:.0f}s", flush=True)
    return results


__all__ = ["run_eval", "ensure_student", "resolve_assets", "heldout_sequences"]

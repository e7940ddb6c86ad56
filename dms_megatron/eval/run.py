"""``run_eval``: re-fit (or reuse) the students, evaluate every method per CR, write eval.json and Pareto plots.

eval.json: {method: {cr: {recall_acc, kl, peak_tokens, kv_reads, ...}}} with method keys vanilla, dms, tova, h2o,
streamingllm, quest. vanilla (the teacher with its full cache) sits under cr "1"; every baseline at CR c runs on the
teacher with the per-head budget matched to the CR-c DMS student on the same task: TOVA, H2O and StreamingLLM
(which evict) at the peak tokens DMS held, Quest (which keeps the whole cache and reads a subset) at the KV reads
DMS made.
``peak_tokens`` / ``kv_reads`` / ``achieved_cr`` are the recall task's (mean per item; the CR of core.compression,
pooled over the items); ``kl_peak_tokens`` / ``kl_kv_reads`` / ``kl_achieved_cr`` those of the held-out text the KL
is measured on. Recall rows also carry ``answer_resident`` (per layer, the fraction of
answers x KV heads whose cache still holds the statement when the question is asked) and
``recall_acc_by_residency``. Every row carries ``kl_by_position``: its KL per ``eval.kl_bucket`` positions (a
budget method loses nothing before its budget fills). DMS rows carry ``kl_whole_cache``: the student's KL on the
same text with nothing evicted, what the re-fit's weight change alone costs; and ``kl_student_h2o``: the student
with H2O evicting at DMS's peak tokens, i.e. the same weights with heuristic decisions instead of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from dms_megatron.checkpoint import TRACKER
from dms_megatron.config import ConfigError, RefitConfig
from dms_megatron.data.embedded import (TEACHER_DIR, cache_root, checksums_of, heldout_file, read_heldout_text, sha256,
                                        verify_teacher)
from dms_megatron.data.recall import read_items
from dms_megatron.eval.config import EvalConfig, cr_key
from dms_megatron.eval.harness import budget_for, kl_metrics, reads_budget_for, recall_metrics, teacher_logits
from dms_megatron.eval.plots import pareto_plots
from dms_megatron.inference.engine import Engine
from dms_megatron.inference.loading import checkpoints_dir, load_model
from dms_megatron.inference.press import make_press
from dms_megatron.megatron.distributed import destroy_process_groups
from dms_megatron.progress import fmt_duration, rate_and_left
from dms_megatron.training.entry import run_rank
from dms_megatron.training.preemption import ABORTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from dms_megatron.training.run_config import write_run_config


class StudentRefitError(RuntimeError):
    """A student's re-fit did not finish; ``code`` is its exit status (4: stopped by a signal, resumable)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class EvalAssets:
    teacher: Path
    recall_eval: Optional[Path]
    kl_sequences: torch.Tensor  # [count, length]
    version: str  # what the students' cache key depends on besides their config


def heldout_sequences(prefix: str, count: int, length: int) -> torch.Tensor:
    """[count, length]: the first ``count`` documents of an indexed dataset with at least ``length`` tokens."""
    if not Path(prefix + ".idx").is_file():
        raise ConfigError(f"held-out data {prefix}.idx does not exist")
    ds = IndexedDataset(prefix)
    out = [torch.as_tensor(ds[i][:length].astype("int64")) for i in range(len(ds)) if len(ds[i]) >= length][:count]
    if len(out) < count:
        raise ConfigError(f"{prefix} has {len(out)} documents of >= {length} tokens; eval.kl_sequences={count} asked "
                          f"for more (lower eval.kl_sequences or eval.kl_length)")
    return torch.stack(out)


def resolve_assets(cfg: EvalConfig) -> EvalAssets:
    r = cfg.refit
    length = cfg.kl_length or r.train.seq_length
    if r.embedded:
        teacher = verify_teacher()  # students re-fitted from an older build of the teacher are not reused
        version = f"{TEACHER_DIR.name}-{sha256(checksums_of(teacher))[:12]}"
        recall = heldout_file(teacher, r.data.recall)
        kl = (heldout_sequences(cfg.valid_prefix, cfg.kl_sequences, length) if cfg.valid_prefix else
              torch.tensor(read_heldout_text(heldout_file(teacher, "text"), cfg.kl_sequences, length)))
    else:
        teacher, recall = Path(r.train.init_checkpoint), r.data.recall_eval
        version = str(teacher.resolve())
        valid = r.data.data_blend().valid
        prefix = cfg.valid_prefix or (valid[0][0] if valid else None)
        if prefix is None:
            raise ConfigError("refit.data.blend is divided by split, so no dataset is held out as a whole: set "
                              "eval.valid_prefix to an indexed held-out text")
        kl = heldout_sequences(prefix, cfg.kl_sequences, length)
    teacher = Path(cfg.teacher) if cfg.teacher else Path(teacher)
    recall = cfg.recall_eval or recall
    for what, p in (("teacher", teacher), ("recall items", recall)):
        if p is not None and not Path(p).exists():
            raise ConfigError(f"{what} {p} does not exist")
    return EvalAssets(teacher, Path(recall) if recall else None, kl, version)


def student_digest(rc: RefitConfig, version: str) -> str:
    """The cache key of a student: the teacher build and everything of its re-fit config that shapes its weights
    (``logging`` does not, so dms-eval, dms-hyperscale and the benchmarks share students whatever they log)."""
    d = rc.to_dict()
    d.pop("logging")
    return hashlib.sha256(json.dumps([version, d], sort_keys=True).encode()).hexdigest()[:12]


def ensure_student(cfg: EvalConfig, cr: float, assets: EvalAssets, run_dir: Path, log=print) -> Path:
    """The checkpoints dir of the student for ``cr``: given in cfg.students, cached, or re-fitted now (in this
    process, one rank)."""
    key = cr_key(cr)
    if key in cfg.students:
        path = checkpoints_dir(cfg.students[key])
        if not (path / TRACKER).is_file():
            raise ConfigError(f"student {cfg.students[key]} holds no checkpoint: pass a dms-refit run dir")
        return path
    d = cfg.refit.to_dict()
    d["dms"]["final_cr"] = float(cr)
    rc = RefitConfig.from_dict(d)
    if rc.parallel.world_size != 1:
        raise ConfigError(f"dms-eval re-fits students with one rank (refit.parallel asks for "
                          f"{rc.parallel.world_size}); re-fit them with dms-refit and pass +students.{key}=RUN_DIR")
    root = (cache_root() / "students" if cfg.reuse_students else run_dir / "students") / \
        f"cr{key}-{student_digest(rc, assets.version)}"
    if (root / "report.json").is_file():
        log(f"student CR {key}: reusing {root}")
        return root / "checkpoints"
    partial = root.with_name(root.name + ".partial")  # a stopped re-fit resumes here on the next dms-eval
    write_run_config(partial, rc)
    log(f"student CR {key}: re-fitting into {root}")
    try:
        code = run_rank(partial)
    finally:
        destroy_process_groups()
    if code:
        what = "stopped" if code in (PREEMPTED_EXIT_CODE, ABORTED_EXIT_CODE) else "failed"
        raise StudentRefitError(f"re-fitting the CR {key} student {what} (exit {code}); {partial} is kept: run "
                                f"dms-eval again to resume it", code)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(partial, root)
    return root / "checkpoints"


def _baseline_budgets(name: str, dms: dict, layers: int, ng: int, items: List[dict], seqs: torch.Tensor):
    """(recall budget, KL budget) per layer and KV head of a baseline matched to the DMS student's row."""
    if name == "quest":
        rec = reads_budget_for(dms["kv_reads"], layers, ng, len(items[0]["ids"])) if items else 1
        return rec, reads_budget_for(dms["kl_kv_reads"], layers, ng, seqs.shape[1])
    return budget_for(dms.get("peak_tokens", dms["kl_peak_tokens"]), layers, ng), \
        budget_for(dms["kl_peak_tokens"], layers, ng)


def _budget_press(name: str, cfg: EvalConfig, budget: int):
    return make_press(name, budget=budget, settings=cfg.press)


class Progress:
    """One line per finished unit of work, with elapsed time and an estimate of what is left."""

    def __init__(self, total: int, log) -> None:
        self.total, self.done, self.t0, self.log = total, 0, time.time(), log

    def step(self, what: str) -> None:
        self.done += 1
        el = time.time() - self.t0
        _, left = rate_and_left(self.done, self.total, el)
        self.log(f"[{self.done}/{self.total}] {what} ({fmt_duration(el)} elapsed, ~{fmt_duration(left)} left)")


def _row(engine: Engine, items: List[dict], seqs: torch.Tensor, t_logits: torch.Tensor, bucket: int,
         kl_engine: Optional[Engine] = None) -> dict:
    """Recall metrics of ``engine`` and KL metrics of ``kl_engine`` (default the same engine) in one row."""
    rec = recall_metrics(engine, items) if items else {}
    kl = kl_metrics(kl_engine or engine, seqs, t_logits, bucket)
    return {**rec, "kl": kl["kl"], "kl_by_position": kl["kl_by_position"], "kl_peak_tokens": kl["peak_tokens"],
            "kl_kv_reads": kl["kv_reads"], "kl_achieved_cr": kl["achieved_cr"]}


def _dms_row(student, items: List[dict], seqs: torch.Tensor, t_logits: torch.Tensor, cfg: EvalConfig) -> dict:
    """The DMS student's row, with the two parts of its KL on text told apart: ``kl_whole_cache`` (the student with
    nothing evicted: what the weight change alone costs) and ``kl_student_h2o`` (the student with H2O choosing what
    to evict at DMS's own peak tokens: its weights with heuristic decisions instead of its own)."""
    dms = _row(Engine(student, make_press("dms", window=student.dms.window)), items, seqs, t_logits, cfg.kl_bucket)
    c = student.cfg
    h2o = _budget_press("h2o", cfg, budget_for(dms["kl_peak_tokens"], c.num_layers, c.num_query_groups))
    return dict(dms, kl_whole_cache=kl_metrics(Engine(student), seqs, t_logits, cfg.kl_bucket)["kl"],
                kl_student_h2o=kl_metrics(Engine(student, h2o), seqs, t_logits, cfg.kl_bucket)["kl"])


def _brief(m: dict) -> str:
    return f"recall={m.get('recall_acc', float('nan')):.3f} kl={m['kl']:.4f} peak={m.get('peak_tokens', 0):.0f}"


def run_eval(cfg: EvalConfig, run_dir: Path, log=print) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    assets = resolve_assets(cfg)
    students = {cr_key(c): ensure_student(cfg, c, assets, run_dir, log) for c in cfg.crs}
    teacher = load_model(assets.teacher)
    items = read_items(assets.recall_eval, cfg.recall_limit) if assets.recall_eval else []
    seqs = assets.kl_sequences
    t_logits = teacher_logits(Engine(teacher), seqs)
    layers, ng = teacher.cfg.num_layers, teacher.cfg.num_query_groups
    baselines = [m for m in cfg.methods if m not in ("vanilla", "dms")]
    progress = Progress(("vanilla" in cfg.methods) + len(cfg.crs) * (1 + len(baselines)), log)
    results: Dict[str, Dict[str, dict]] = {m: {} for m in cfg.methods}
    if "vanilla" in results:
        results["vanilla"]["1"] = _row(Engine(teacher), items, seqs, t_logits, cfg.kl_bucket)
        progress.step(f"vanilla: {_brief(results['vanilla']['1'])}")
    for c in cfg.crs:
        key = cr_key(c)
        student = load_model(students[key], require_dms=True)
        dms = dict(_dms_row(student, items, seqs, t_logits, cfg), student=str(students[key]))
        progress.step(f"CR {key} dms: {_brief(dms)}, whole-cache kl={dms['kl_whole_cache']:.4f}, "
                      f"kl with H2O choosing={dms['kl_student_h2o']:.4f}")
        if "dms" in results:
            results["dms"][key] = dms
        # the recall and KL tasks have different lengths, so each gets the budget DMS reached on it: eviction
        # methods at DMS's peak tokens, Quest (whole cache, reads less) at DMS's KV reads
        for name in baselines:
            b_rec, b_kl = _baseline_budgets(name, dms, layers, ng, items, seqs)
            results[name][key] = dict(_row(Engine(teacher, _budget_press(name, cfg, b_rec)), items, seqs, t_logits,
                                           cfg.kl_bucket, Engine(teacher, _budget_press(name, cfg, b_kl))),
                                      budget=b_rec, kl_budget=b_kl)
            progress.step(f"CR {key} {name} (budget {b_rec}): {_brief(results[name][key])}")
        if "answer_resident" in dms:
            log(f"CR {key}: dms holds the statement per layer {dms['answer_resident']}; recall by residency "
                f"{dms['recall_acc_by_residency']['any_layer']}")
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    pareto_plots(results, run_dir)
    log(f"wrote {run_dir / 'eval.json'} and the Pareto plots in {time.time() - progress.t0:.0f} s")
    return results


__all__ = ["run_eval", "ensure_student", "resolve_assets", "heldout_sequences", "EvalAssets", "StudentRefitError"]

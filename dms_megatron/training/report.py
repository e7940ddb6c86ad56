"""End-of-run evaluation on one rank: report.json (held-out KL, achieved CR, teacher and student recall) and
refit.png. A tensor/pipeline-parallel run is evaluated from its final checkpoint, resharded to tp = pp = 1, in a
fresh one-rank process (``report_from_checkpoint``; the worker starts it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import matplotlib
import yaml

from dms_megatron.checkpoint import load_model_weights
from dms_megatron.config import RefitConfig
from dms_megatron.data.indexed import collate
from dms_megatron.data.recall import read_items
from dms_megatron.megatron.distributed import destroy_process_groups, init_process_groups
from dms_megatron.megatron.model import build_gpt_model
from dms_megatron.training.evaluation import heldout_metrics, recall_accuracy
from dms_megatron.training.inputs import RunInputs
from dms_megatron.training.weights import load_init_weights

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)


def run_figure(history: List[dict], title: str):
    """Target vs achieved CR (training decisions, and the evaluate stage's held-out inference eviction where it ran)
    and the losses over the steps of a run. Returns the matplotlib figure (caller closes it)."""
    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    a.plot(steps, [h["target_cr"] for h in history], label="target CR")
    a.plot(steps, [h["achieved_cr_train"] for h in history], label="achieved CR (train decisions)")
    evals = [h for h in history if "valid/achieved_cr" in h]
    if evals:
        a.plot([h["step"] for h in evals], [h["valid/achieved_cr"] for h in evals], "o",
               label="held-out CR (inference eviction)")
    a.set_xlabel("step")
    a.set_ylabel("compression ratio")
    a.legend(fontsize=8)
    b.plot(steps, [h["kd_loss"] for h in history], label="KD loss (nats/token)")
    b.plot(steps, [h["compression_loss"] for h in history], label="compression loss")
    if evals:
        b.plot([h["step"] for h in evals], [h["valid/kd_loss"] for h in evals], "o", label="held-out KD")
    b.set_xlabel("step")
    b.set_yscale("symlog", linthresh=1e-4)  # the compression loss is exactly 0 once the target is met
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def run_title(run_dir: Path, cfg: RefitConfig, achieved_cr: float) -> str:
    mc, d, t = cfg.model, cfg.dms, cfg.train
    model = f"{mc.family} {mc.num_layers}L x {mc.hidden_size}"
    return (f"{Path(run_dir).resolve().name}: {model}, target CR {d.final_cr:g}, window {d.window}, "
            f"{d.alpha_source}, {t.mode} re-fit, {t.steps} steps, LR {t.lr:g} -> held-out CR {achieved_cr:.2f}")


def plot_run(history: List[dict], path: Path, title: str) -> None:
    fig = run_figure(history, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, cfg: RefitConfig, inputs: RunInputs, student, teacher, valid_ds,
                 history: List[dict]) -> dict:
    t, d = cfg.train, cfg.dms
    vocab = inputs.model_config.vocab_size
    n = min(len(valid_ds), t.eval_batches * t.micro_batch_size)
    batches = [collate([valid_ds[i] for i in range(s, min(n, s + t.micro_batch_size))])
               for s in range(0, n, t.micro_batch_size)]
    m = heldout_metrics(student, teacher, batches, vocab)
    report = {"target_cr": d.final_cr, "achieved_cr": m["achieved_cr"], "kept_fraction": m["kept_fraction"],
              "kl_to_teacher": m["kl_to_teacher"], "steps": t.steps,
              "tokens_per_s": (sum(h["tokens_per_s"] for h in history) / len(history)) if history else None,
              "window": d.window, "alpha_source": d.alpha_source, "train_mode": t.mode}
    if inputs.recall_eval:
        items = read_items(inputs.recall_eval, t.recall_eval_limit)
        report["teacher_recall_acc"] = recall_accuracy(teacher, items, vocab)
        report["student_recall_acc"] = recall_accuracy(student, items, vocab, runtime_mode="hard")
        report["recall_answers"] = sum(len(it["answers"]) for it in items)
    if history:
        report["final_train"] = {k: history[-1][k] for k in ("kd_loss", "compression_loss", "evicted_fraction",
                                                              "target_fraction")}
        plot_run(history, Path(run_dir) / "refit.png", run_title(run_dir, cfg, m["achieved_cr"]))
    Path(run_dir, "report.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    """The one-line summary of a report the worker prints."""
    return "report: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in report.items() if not isinstance(v, dict))


def read_history(run_dir: Path) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def report_from_checkpoint(run_dir: Path) -> dict:
    """The report of a finished run from its config.yaml and final checkpoint, in this process at tp = pp = 1."""
    d = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    d["parallel"] = dict(d.get("parallel") or {}, tp=1, pp=1, sequence_parallel=False, nproc_per_node=None,
                         nnodes=1)
    cfg = RefitConfig.from_dict(d)
    init_process_groups(1, 1, seed=cfg.train.seed)
    try:
        inputs = RunInputs.resolve(cfg, build=True)
        mc, seq = inputs.model_config, cfg.train.seq_length
        teacher = build_gpt_model(mc, None, seq_length=seq)
        load_init_weights(inputs.init, teacher, mc)
        teacher.eval()
        student = build_gpt_model(mc, cfg.dms, seq_length=seq)
        load_model_weights(Path(run_dir) / "checkpoints", student)
        _, valid_ds = inputs.datasets(cfg, run_dir)
        return write_report(Path(run_dir), cfg, inputs, student, teacher, valid_ds, read_history(run_dir))
    finally:
        destroy_process_groups()


__all__ = ["write_report", "report_from_checkpoint", "plot_run", "run_figure", "run_title", "read_history", "format_report"]

"""The end-of-run report files: report.json (held-out KL, achieved CR, teacher and student recall, computed by the
trainer's report stage at the training layout) and refit.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import matplotlib

from dms_megatron.config import RefitConfig

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


def write_report(run_dir: Path, cfg: RefitConfig, heldout: dict, recall: Optional[dict],
                 history: List[dict], memory: Optional[dict] = None) -> dict:
    """report.json (and refit.png) from the report stage's numbers: ``heldout`` the evaluate stage's
    (valid/kd_loss, valid/evicted_fraction, valid/achieved_cr), ``recall`` (teacher_recall_acc, student_recall_acc,
    recall_answers) or None where the task has no answers; ``memory`` ({key: [value of global rank 0, 1, ...]}, host
    bytes: rss_before_build_bytes, rss_after_build_bytes, peak_rss_bytes) is written as report["memory"]."""
    t, d = cfg.train, cfg.dms
    cr = heldout["valid/achieved_cr"]
    report = {"target_cr": d.final_cr, "achieved_cr": cr, "kept_fraction": 1.0 - heldout["valid/evicted_fraction"],
              "kl_to_teacher": heldout["valid/kd_loss"], "steps": t.steps,
              "tokens_per_s": (sum(h["tokens_per_s"] for h in history) / len(history)) if history else None,
              "window": d.window, "alpha_source": d.alpha_source, "train_mode": t.mode, **(recall or {})}
    if history:
        report["final_train"] = {k: history[-1][k] for k in ("kd_loss", "compression_loss", "evicted_fraction",
                                                              "target_fraction")}
        plot_run(history, Path(run_dir) / "refit.png", run_title(run_dir, cfg, cr))
    if memory is not None:
        report["memory"] = memory
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


__all__ = ["write_report", "plot_run", "run_figure", "run_title", "read_history", "format_report"]

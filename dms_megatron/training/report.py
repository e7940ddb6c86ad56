"""End-of-run evaluation: report.json (held-out KL, achieved CR, recall accuracy) and a PNG of the run."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _plot(history: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(steps, [h["target_cr"] for h in history], label="target CR")
    a.plot(steps, [h["achieved_cr_train"] for h in history], label="achieved CR (train decisions)")
    a.set_xlabel("step")
    a.set_ylabel("compression ratio")
    a.legend()
    b.plot(steps, [h["kd_loss"] for h in history], label="KD loss")
    b.plot(steps, [h["compression_loss"] for h in history], label="compression loss")
    b.set_xlabel("step")
    b.set_yscale("symlog", linthresh=1e-4)  # the compression loss is exactly 0 once the target is met
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, cfg, res, student, teacher, valid_ds, logger, runtime_cls) -> dict:
    from dms_megatron.data.indexed import collate
    from dms_megatron.data.recall import score_recall
    from dms_megatron.megatron.runtime import attach_runtime
    from dms_megatron.training.evaluation import greedy_predict_fn, heldout_metrics

    t = cfg.train
    vocab = res.model_config.vocab_size
    n = min(len(valid_ds), t.eval_batches * t.micro_batch_size)
    batches = [collate([valid_ds[i] for i in range(s, min(n, s + t.micro_batch_size))])
               for s in range(0, n, t.micro_batch_size)]
    m = heldout_metrics(student, teacher, batches, vocab, runtime_cls)
    history = logger.history()
    report = {
        "target_cr": cfg.dms.final_cr,
        "achieved_cr": m["achieved_cr"],
        "kept_fraction": m["kept_fraction"],
        "kl_to_teacher": m["kl_to_teacher"],
        "steps": t.steps,
        "tokens_per_s": (sum(h["tokens_per_s"] for h in history) / len(history)) if history else None,
        "window": cfg.dms.window,
        "alpha_source": cfg.dms.alpha_source,
        "train_mode": t.mode,
    }
    if res.recall_eval:
        report["teacher_recall_acc"] = score_recall(greedy_predict_fn(teacher, vocab), res.recall_eval,
                                                    t.recall_eval_limit)
        report["student_recall_acc"] = score_recall(greedy_predict_fn(student, vocab, runtime_cls(mode="hard")),
                                                    res.recall_eval, t.recall_eval_limit)
        attach_runtime(student, None)
    if history:
        report["final_train"] = {k: history[-1][k] for k in ("kd_loss", "compression_loss", "evicted_fraction",
                                                              "target_fraction")}
        _plot(history, Path(run_dir) / "refit.png")
    Path(run_dir, "report.json").write_text(json.dumps(report, indent=2))
    return report

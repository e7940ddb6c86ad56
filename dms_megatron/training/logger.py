"""Per-step metrics: metrics.jsonl in the run dir (the source of truth), wandb (offline by default), and progress
for a person: a rich bar on a terminal, else (nohup, SLURM, submitit) one plain line every ``log_interval`` steps
with the rate and the time left."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from dms_megatron.progress import fmt_duration, rate_and_left
from dms_megatron.training.report import read_history


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, *, start_step: int, enabled: bool = True, stream=None):
        self.enabled, self.cfg = enabled, cfg
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total, self.start = cfg.train.steps, start_step
        self.stream = stream or sys.stdout
        self._wandb = self._progress = None
        self._t0 = time.time()
        if not enabled:
            return
        if self.path.exists():  # on resume keep only the steps the restored state had completed
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self._wandb = self._start_wandb(run_dir)
        if cfg.logging.progress and self.stream.isatty():
            self._progress = Progress(TextColumn("refit"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._task = self._progress.add_task("refit", total=self.total, completed=start_step, info="")
            self._progress.start()

    def _start_wandb(self, run_dir):
        lc = self.cfg.logging
        if not lc.wandb or lc.wandb_mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            return None
        try:
            import wandb  # optional at run time: a broken wandb install must not stop training

            return wandb.init(project=lc.wandb_project, dir=str(run_dir), mode=lc.wandb_mode,
                              config=self.cfg.to_dict(), resume="allow", reinit=True)
        except Exception as e:  # noqa: BLE001 - logging must not kill a training run
            print(f"wandb disabled: {type(e).__name__}: {e}", flush=True)
            return None

    @staticmethod
    def summary(m: dict) -> str:
        return (f"kd {m['kd_loss']:.4f} comp {m['compression_loss']:.3f} CR {m['achieved_cr_train']:.2f}/"
                f"{m['target_cr']:.2f} {m['tokens_per_s']:.0f} tok/s")

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=int(metrics["step"]))
        step = int(metrics["step"])
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=self.summary(metrics))
        elif step % self.cfg.logging.log_interval == 0 or step == self.total:
            rate, left = rate_and_left(step - self.start, self.total - self.start, time.time() - self._t0)
            print(f"step {step}/{self.total} loss {metrics['loss']:.4f} {self.summary(metrics)} | "
                  f"{rate:.2f} steps/s, {fmt_duration(left)} left", file=self.stream, flush=True)

    def history(self) -> list:
        return read_history(self.path.parent)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


__all__ = ["MetricsLogger"]

"""Per-step metrics: metrics.jsonl in the run dir (the source of truth), wandb (offline by default), rich bar."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, *, start_step: int, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.cfg = cfg
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        # On resume keep only the steps the restored state had completed.
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        lc = cfg.logging
        if lc.wandb and lc.wandb_mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project=lc.wandb_project, dir=str(run_dir), mode=lc.wandb_mode,
                                         config=cfg.to_dict(), resume="allow", reinit=True)
            except Exception as e:  # noqa: BLE001 - logging must not kill a training run
                print(f"wandb disabled: {type(e).__name__}: {e}", flush=True)
                self._wandb = None
        if lc.progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("refit"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._task = self._progress.add_task("refit", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=int(metrics["step"]))
        if self._progress is not None:
            info = (f"kd {metrics['kd_loss']:.4f} comp {metrics['compression_loss']:.3f} "
                    f"CR {metrics['achieved_cr_train']:.2f}/{metrics['target_cr']:.2f} "
                    f"{metrics['tokens_per_s']:.0f} tok/s")
            self._progress.update(self._task, completed=int(metrics["step"]), info=info)
        elif int(metrics["step"]) % max(1, self.cfg.logging.log_interval) == 0:
            print(f"step {int(metrics['step'])} loss {metrics['loss']:.4f} kd {metrics['kd_loss']:.4f} "
                  f"evicted {metrics['evicted_fraction']:.3f}/{metrics['target_fraction']:.3f}", flush=True)

    def history(self) -> list:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

"""``dms-sweep-summary DIR``: one table (and CSV, JSON, PNG) over the run dirs of a sweep.

DIR is a Hydra multirun dir (``runs/sweep/<timestamp>/`` with one numbered run dir per point, local or through the
submitit SLURM launcher) or any folder of run dirs (e.g. ``runs/slurm/`` of several ``sbatch slurm/refit.sbatch``
jobs). A run dir is a sub-directory holding ``config.yaml``, ``.hydra/`` or ``status.json``. A point counts as
*finished* only when its ``report.json`` exists and, for batch jobs, its ``status.json`` says COMPLETED; every other
point is listed with its state (RUNNING, PREEMPTED, FAILED, or INCOMPLETE when nothing says more) and no metrics.

Writes ``summary.csv``, ``summary.json`` and ``summary.png`` (achieved CR and KL to the teacher against the target
CR, one line per window) into DIR (or ``--out``). Exit status 0 when every point finished, 1 otherwise (the table
is still written), 2 when DIR holds no run dirs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Optional

import matplotlib
import yaml
from rich.console import Console
from rich.table import Table

from dms_megatron.config import BAD_INPUT_EXIT_CODE

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

COLUMNS = ("run", "final_cr", "window", "state", "achieved_cr", "kept_fraction", "kl_to_teacher",
           "student_recall_acc", "teacher_recall_acc", "steps", "tokens_per_s")


def _is_run_dir(d: Path) -> bool:
    return d.is_dir() and not d.name.startswith(".") and any(
        (d / n).exists() for n in ("config.yaml", ".hydra", "status.json"))


def _point(d: Path) -> tuple:
    """(final_cr, window) from the resolved config.yaml, else from the Hydra overrides (a run that failed
    validation has no config.yaml)."""
    if (d / "config.yaml").is_file():
        dms = (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("dms", {})
        return dms.get("final_cr"), dms.get("window")
    found = {}
    ov = d / ".hydra" / "overrides.yaml"
    if ov.is_file():
        for item in yaml.safe_load(ov.read_text()) or []:
            key, _, value = str(item).partition("=")
            if key.lstrip("+~") in ("dms.final_cr", "dms.window"):
                found[key.lstrip("+~")] = yaml.safe_load(value)
    return found.get("dms.final_cr"), found.get("dms.window")


def read_run(d: Path) -> dict:
    """One row: the point, its state and, when finished, its report.json metrics."""
    final_cr, window = _point(d)
    status = json.loads((d / "status.json").read_text()) if (d / "status.json").is_file() else None
    report = json.loads((d / "report.json").read_text()) if (d / "report.json").is_file() else None
    if report is not None and (status is None or status.get("state") == "COMPLETED"):
        state = "FINISHED"
    elif status is not None and status.get("state") not in (None, "COMPLETED"):
        state = status["state"]
    else:
        state = "INCOMPLETE"
    row = {c: None for c in COLUMNS}
    row.update(run=d.name, final_cr=final_cr, window=window, state=state)
    if state == "FINISHED":
        row.update({k: report.get(k) for k in COLUMNS[4:]})
    return row


def collect(sweep_dir: Path) -> list:
    def order(d: Path):
        return (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name)

    return [read_run(d) for d in sorted((d for d in Path(sweep_dir).iterdir() if _is_run_dir(d)), key=order)]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_table(rows: list, title: str) -> None:
    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("run", "state") else "right")
    for r in rows:
        t.add_row(*(_fmt(r[c]) for c in COLUMNS), style=None if r["state"] == "FINISHED" else "red")
    Console(width=200).print(t)


def plot(rows: list, path: Path) -> None:
    done = [r for r in rows if r["state"] == "FINISHED" and r["final_cr"] is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for w in sorted({r["window"] for r in done}, key=lambda x: (x is None, x)):
        pts = sorted((r for r in done if r["window"] == w), key=lambda r: r["final_cr"])
        a.plot([r["final_cr"] for r in pts], [r["achieved_cr"] for r in pts], "o-", label=f"window {w}")
        b.plot([r["final_cr"] for r in pts], [r["kl_to_teacher"] for r in pts], "o-", label=f"window {w}")
    crs = sorted({r["final_cr"] for r in done})
    if crs:
        a.plot(crs, crs, "k:", label="target")
    a.set_xlabel("target CR (dms.final_cr)")
    a.set_ylabel("achieved CR (held-out, hard decisions)")
    b.set_xlabel("target CR (dms.final_cr)")
    b.set_ylabel("KL to teacher (nats/token)")
    for ax in (a, b):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(sweep_dir: Path, out_dir: Optional[Path] = None, rows: Optional[list] = None) -> list:
    """Collect the rows and write summary.{csv,json,png} into ``out_dir`` (default: the sweep dir)."""
    rows = collect(sweep_dir) if rows is None else rows
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "summary.png")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dms-sweep-summary", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="multirun dir (runs/sweep/<timestamp>) or a folder of run dirs")
    ap.add_argument("--out", type=Path, default=None, help="where summary.{csv,json,png} go (default: sweep_dir)")
    args = ap.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    rows = collect(args.sweep_dir)
    if not rows:
        print(f"error: {args.sweep_dir} holds no run dirs (sub-directories with config.yaml, .hydra/ or "
              f"status.json)", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    write_summary(args.sweep_dir, args.out, rows)
    print_table(rows, str(args.sweep_dir))
    out = args.out or args.sweep_dir
    print(f"wrote {out / 'summary.csv'}, {out / 'summary.json'}, {out / 'summary.png'}")
    bad = [r["run"] for r in rows if r["state"] != "FINISHED"]
    if bad:
        print(f"not finished: {', '.join(bad)} (no report.json or job not COMPLETED)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

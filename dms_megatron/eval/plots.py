"""Pareto plots of eval.json: quality (recall accuracy, KL to the teacher) against KV reads and peak tokens.

One point per method and CR (lines join a method's CRs, each point labelled with its CR); the recall panel is drawn
only when recall was measured; tick labels are plain short numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import matplotlib
from matplotlib.ticker import FuncFormatter

from dms_megatron.eval.budget import families

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

MARKERS = {"vanilla": "*", "dms": "o", "tova": "s", "h2o": "^", "streamingllm": "v", "quest": "D"}
AXES = (("kv_reads", "kl_kv_reads", "KV tokens read per sequence"),
        ("peak_tokens", "kl_peak_tokens", "peak KV tokens resident per sequence"))


def short_number(x: float, _pos=None) -> str:
    """Tick label: 3 significant digits, no float noise (9.34585e-4 -> 0.000935, 12000 -> 12k)."""
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x / 1000:.3g}k"
    return f"{x:.3g}"


def _panel(ax, results: Dict[str, dict], x_key: str, y_key: str, xlabel: str, ylabel: str) -> None:
    for method, per_cr in results.items():
        pts = sorted(((cr, m) for cr, m in per_cr.items() if y_key in m), key=lambda kv: float(kv[0]))
        if not pts:
            continue
        xs, ys = [m[x_key] for _, m in pts], [m[y_key] for _, m in pts]
        ax.plot(xs, ys, marker=MARKERS.get(method, "x"), label=method)
        for (cr, _), x, y in zip(pts, xs, ys):
            ax.annotate(f"CR {cr}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(short_number))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, p: ""))
    ax.yaxis.set_major_formatter(FuncFormatter(short_number))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def pareto_figure(results: dict, x_key: str, kl_x_key: str, label: str, title: Optional[str] = None):
    """The figure of one x axis: [recall panel,] KL panel. Returns the matplotlib figure (caller closes it)."""
    has_recall = any("recall_acc" in m for per_cr in results.values() for m in per_cr.values())
    fig, axes = plt.subplots(1, 2 if has_recall else 1, figsize=(11.5 if has_recall else 6.5, 4.5), squeeze=False)
    if has_recall:
        _panel(axes[0][0], results, x_key, "recall_acc", label + " (recall task)",
               "recall accuracy (higher is better)")
    kl_ax = axes[0][-1]
    _panel(kl_ax, results, kl_x_key, "kl", label + " (held-out text)", "KL to teacher, nats/token (lower is better)")
    kl_ax.set_yscale("symlog", linthresh=1e-3)
    kl_ax.yaxis.set_major_formatter(FuncFormatter(short_number))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pareto_plots(results: dict, out_dir: Path, title: Optional[str] = None) -> List[Path]:
    """Writes pareto_kv_reads.png and pareto_peak_tokens.png; returns the paths."""
    paths = []
    for x_key, kl_x_key, label in AXES:
        fig = pareto_figure(results, x_key, kl_x_key, label, title)
        path = Path(out_dir) / f"pareto_{x_key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


FRONTIER_AXES = {"peak_tokens": "peak KV tokens of a question's W chains",
                  "kv_reads": "KV tokens read generating a question's W chains",
                  "latency_s": "modeled decode latency per question, s"}


def frontier_plots(out: dict, out_dir: Path) -> List[Path]:
    """hyperscale_<axis>.png per budget axis of hyperscale.json: every (L, W[, CR]) point faint, and each method's
    frontier (the best accuracy at or under each budget) as a step line."""
    paths = []
    for axis, label in FRONTIER_AXES.items():
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for fam, entries in families(out["methods"]).items():
            pts = sorted((r[axis], r["accuracy"]) for e in entries for r in e["rows"])
            xs, best, ys = [], -1.0, []
            for x, y in pts:
                if y > best:
                    best = y
                    xs.append(x)
                    ys.append(y)
            line, = ax.step(xs + [pts[-1][0]], ys + [ys[-1]], where="post", label=fam,
                            marker=MARKERS.get(fam.split("@")[0], "x"), markersize=4)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.25, color=line.get_color())
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(short_number))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, p: ""))
        ax.set_xlabel(label)
        ax.set_ylabel("majority-vote accuracy (higher is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"hyperscale_{axis}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["pareto_plots", "pareto_figure", "frontier_plots", "short_number", "AXES", "FRONTIER_AXES"]

"""Pareto plots of eval.json: quality (recall accuracy, KL to the teacher) against KV reads and peak tokens."""

from __future__ import annotations

from pathlib import Path

MARKERS = {"vanilla": "*", "dms": "o", "tova": "s", "h2o": "^", "streamingllm": "v", "quest": "D"}


def pareto_plots(results: dict, out_dir: Path) -> list:
    """Writes pareto_kv_reads.png and pareto_peak_tokens.png (one point per method and CR; lines join a method's
    CRs). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, kl_x_key, label in (("kv_reads", "kl_kv_reads", "KV tokens read per sequence"),
                                   ("peak_tokens", "kl_peak_tokens", "peak KV tokens resident per sequence")):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        for method, per_cr in results.items():
            pts = sorted(per_cr.items(), key=lambda kv: float(kv[0]))
            mk = MARKERS.get(method, "x")
            if all("recall_acc" in m for _, m in pts):
                a.plot([m[x_key] for _, m in pts], [m["recall_acc"] for _, m in pts], marker=mk, label=method)
            b.plot([m[kl_x_key] for _, m in pts], [m["kl"] for _, m in pts], marker=mk, label=method)
            for cr, m in pts:
                b.annotate(cr, (m[kl_x_key], m["kl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        a.set_xlabel(label + " (recall task)")
        a.set_ylabel("recall accuracy (higher is better)")
        b.set_xlabel(label + " (held-out text)")
        b.set_ylabel("KL to teacher per token (lower is better)")
        b.set_yscale("symlog", linthresh=1e-3)
        for ax in (a, b):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        a.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"pareto_{x_key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["pareto_plots"]

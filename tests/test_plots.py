"""The figures a user reads: dms-eval's Pareto plots and a re-fit's refit.png."""


def test_plots_label_points_and_drop_an_empty_recall_panel(tmp_path):
    import matplotlib.pyplot as plt

    from dms_megatron.eval.plots import pareto_figure, pareto_plots, short_number

    assert [short_number(x) for x in (9.34585e-4, 0.0123456, 3.0, 12345.0, 0)] == ["0.000935", "0.0123", "3",
                                                                                  "12.3k", "0"]
    row = {"kl": 9.34585e-4, "kl_kv_reads": 100.0, "kl_peak_tokens": 10.0, "kv_reads": 90.0, "peak_tokens": 9.0}
    results = {"vanilla": {"1": dict(row, kl=0.0)}, "dms": {"4": row, "8": dict(row, kl=0.02, kl_kv_reads=50.0)}}

    def texts(ax):
        return sorted(t.get_text() for t in ax.texts)

    fig = pareto_figure(results, "kv_reads", "kl_kv_reads", "KV tokens read", title="t")
    (kl_ax,) = fig.axes  # no recall measured: no recall panel at all
    assert texts(kl_ax) == ["CR 1", "CR 4", "CR 8"]  # every point labelled with its CR
    assert [t.get_text() for t in kl_ax.get_legend().get_texts()] == ["vanilla", "dms"]
    fig.canvas.draw()
    ticks = [t.get_text() for t in kl_ax.get_yticklabels() + kl_ax.get_xticklabels() if t.get_text()]
    assert ticks and all("e" not in t and len(t) <= 8 for t in ticks), ticks
    plt.close(fig)
    with_recall = {m: {c: dict(r, recall_acc=0.5) for c, r in v.items()} for m, v in results.items()}
    fig = pareto_figure(with_recall, "kv_reads", "kl_kv_reads", "KV tokens read")
    recall_ax, kl_ax = fig.axes
    assert "recall" in recall_ax.get_ylabel() and "KL" in kl_ax.get_ylabel()
    assert texts(recall_ax) == texts(kl_ax) == ["CR 1", "CR 4", "CR 8"]
    plt.close(fig)
    paths = pareto_plots(results, tmp_path)
    assert [p.name for p in paths] == ["pareto_kv_reads.png", "pareto_peak_tokens.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_the_refit_plot_says_which_run_it_shows(tmp_path):
    import matplotlib.pyplot as plt

    from dms_megatron.config import TINY_TEACHER, RefitConfig
    from dms_megatron.training.report import run_figure, run_title

    cfg = RefitConfig(TINY_TEACHER)
    title = run_title(tmp_path / "my-run", cfg, 4.64)
    mc, d = cfg.model, cfg.dms
    for part in ("my-run", f"{mc.family} {mc.num_layers}L x {mc.hidden_size}", f"target CR {d.final_cr:g}",
                 f"window {d.window}", d.alpha_source, f"{cfg.train.steps} steps", "held-out CR 4.64"):
        assert part in title, (part, title)
    step = {"target_cr": 2.0, "achieved_cr_train": 1.9, "kd_loss": 0.1, "compression_loss": 0.0}
    history = [dict(step, step=1), dict(step, step=2, **{"valid/achieved_cr": 2.1, "valid/kd_loss": 0.2})]
    fig = run_figure(history, title)
    assert fig._suptitle.get_text() == title
    cr_ax, loss_ax = fig.axes
    assert [t.get_text() for t in cr_ax.get_legend().get_texts()] == [
        "target CR", "achieved CR (train decisions)", "held-out CR (inference eviction)"]
    assert "held-out KD" in [t.get_text() for t in loss_ax.get_legend().get_texts()]
    plt.close(fig)

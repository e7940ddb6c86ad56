"""What a new user hits in the first hour, each reproduced through the real commands: Ctrl-C checkpoints, resume
refuses a changed run, --prepare-only catches bad input before anything starts, one-line errors, progress lines
when stdout is no terminal, nothing half-written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from refit_fixtures import refit_dict, shared_assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def _env():
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT / "tests"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _refit(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dms_megatron.launch.refit", *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _overrides(assets, **train):
    d = refit_dict(assets, **train)
    out = [f"model.{k}={v}" for k, v in d["model"].items() if v is not None] + ["embedded=false"]
    for section in ("train", "data", "dms"):
        out += [f"{section}.{k}={v}" for k, v in d[section].items() if v is not None]
    return out + ["logging.wandb=false", "logging.progress=false"]


def _one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def _steps(run: Path):
    p = run / "metrics.jsonl"
    return [json.loads(ln)["step"] for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------
def _start(assets, run: Path, **extra):
    args = _overrides(assets, steps=400, save_interval=1000, micro_batch_size=4, global_batch_size=16)
    args += [f"{k}={v}" for k, v in extra.items()]
    return subprocess.Popen([sys.executable, "-m", "dms_megatron.launch.refit", *args, f"hydra.run.dir={run}"],
                            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, run: Path, n: int, timeout=300):
    t0 = time.time()
    while len(_steps(run)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def test_ctrl_c_checkpoints_at_the_next_step_and_exits_4_then_resumes(assets, tmp_path):
    run = tmp_path / "run"
    proc = _start(assets, run)
    _wait_for_steps(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    assert "received SIGINT: will checkpoint and stop after the current step" in out
    assert "Traceback" not in err
    done = _steps(run)[-1]
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(done)
    again = _refit(_overrides(assets, steps=done + 1, save_interval=1000, micro_batch_size=4, global_batch_size=16)
                   + [f"hydra.run.dir={run}", "resume.allow_changes=[train.steps]"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints'} at step {done}" in again.stdout
    assert _steps(run) == list(range(1, done + 2))


def test_a_second_ctrl_c_aborts_at_once_in_one_line(assets, tmp_path):
    run = tmp_path / "run"
    proc = _start(assets, run)
    _wait_for_steps(proc, run, 1)
    proc.send_signal(signal.SIGINT)
    # Two signals that land while the main thread is inside one C call reach Python's handler once: send the
    # second only after the first was handled (its line is printed), while the step it waits for still runs.
    for line in proc.stdout:
        if line.startswith("received SIGINT"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("aborted by Ctrl-C") and "Traceback" not in err


@pytest.mark.parallel
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_of_local_ranks_stops_every_rank_at_a_checkpoint(assets, tmp_path, sig):
    """`kill` / `kill -INT` of dms-refit (not the terminal's process group): the launcher forwards the signal to its
    ranks once; they checkpoint the same step, exit 4, and no rank outlives the launcher."""
    import psutil

    run = tmp_path / "run"
    proc = _start(assets, run, **{"parallel.nproc_per_node": 2})
    _wait_for_steps(proc, run, 1)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in ranks if "dms_megatron.launch.worker" in " ".join(p.cmdline())]) == 2
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    assert out.count(f"received {sig.name}: will checkpoint") == 1  # one acknowledgement for the job
    assert "Traceback" not in err
    done = _steps(run)[-1]
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(done)
    psutil.wait_procs(ranks, timeout=30)
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# ---- resume ------------------------------------------------------------------------------------------------------
def test_resume_refuses_a_changed_run_and_never_overwrites_its_config(assets, tmp_path):
    run = tmp_path / "run"
    first = _refit(_overrides(assets, steps=2) + [f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run / "config.yaml").read_text()
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    assert run / ".hydra" / "overrides.yaml" in kept
    line = _one_error_line(_refit(_overrides(assets, steps=3) + ["dms.window=8", f"hydra.run.dir={run}"]))
    assert "dms.window: 4 -> 8" in line and "train.steps: 2 -> 3" in line and "new run dir" in line
    line = _one_error_line(_refit(_overrides(assets, steps=3) + [f"hydra.run.dir={run}"]))
    assert "resume.allow_changes" in line
    line = _one_error_line(_refit(_overrides(assets, steps=2) + ["dms.window=8", "resume.allow_changes=[dms.window]",
                                                                 f"hydra.run.dir={run}"]))
    assert "may only name train.steps" in line
    assert (run / "config.yaml").read_text() == before and _steps(run) == [1, 2]
    # the refused re-runs left the run as it was: Hydra's .hydra/ record and the log untouched, nothing added
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts} == kept
    ok = _refit(_overrides(assets, steps=3) + ["resume.allow_changes=[train.steps]", f"hydra.run.dir={run}"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "resume: train.steps 2 -> 3 (allowed by resume.allow_changes)" in ok.stdout
    assert (run / "config.prev-1.yaml").read_text() == before and _steps(run) == [1, 2, 3]


# ---- the batch host's pre-flight ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change,needle", [
    ({"train.init_checkpoint": "/nowhere/ckpt"}, "train.init_checkpoint /nowhere/ckpt does not exist"),
    ({"data.train_prefix": "/nowhere/train"}, "/nowhere/train.bin does not exist"),
    ({"data.tokenizer": "/nowhere/tok"}, "tokenizer directory /nowhere/tok does not exist"),
    ({"parallel.nproc_per_node": 2, "train.micro_batch_size": 4},
     "train.global_batch_size=4 must be a multiple of train.micro_batch_size * data-parallel size = 4 * 2"),
    ({"train.seq_length": 128, "model.max_position_embeddings": 128},
     "train.seq_length=128 exceeds the teacher's max_position_embeddings=64"),
])
def test_prepare_only_catches_bad_input_before_anything_is_written(assets, tmp_path, change, needle):
    args = [a for a in _overrides(assets) if a.split("=")[0] not in change]
    r = _refit(["--prepare-only", *args, *(f"{k}={v}" for k, v in change.items()), f"hydra.run.dir={tmp_path / 'r'}"])
    assert needle in _one_error_line(r)
    assert not (tmp_path / "r").exists()  # no run dir at all: no config.yaml, no .hydra/, no log


def test_readme_data_parallel_preset_prepares(tmp_path):
    """`dms-refit parallel=dp2` exactly as the README writes it: the preset alone must fit the default batch."""
    r = _refit(["--prepare-only", "parallel=dp2", f"hydra.run.dir={tmp_path / 'r'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    t = cfg["train"]
    assert cfg["parallel"]["nproc_per_node"] == 2 and t["global_batch_size"] % (t["micro_batch_size"] * 2) == 0


def test_a_lock_wait_says_whom_it_waits_for(tmp_path):
    import fcntl
    import threading

    from dms_megatron.data.embedded import file_lock

    lock = tmp_path / "build.lock"
    holder = open(lock, "w")
    holder.write("4242")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX)
    said = []
    waiter = threading.Thread(target=lambda: file_lock(lock, "the data build", said.append).__enter__())
    waiter.start()
    time.sleep(0.5)
    assert said == [f"waiting for the data build: process 4242 holds {lock}"]
    fcntl.flock(holder, fcntl.LOCK_UN)
    waiter.join(timeout=10)
    assert not waiter.is_alive()


def test_sigterm_during_the_data_build_is_one_line_and_leaves_no_partial_build(tmp_path):
    """The embedded default's first run builds its re-fit data: a stop then removes the partial build and says so in
    one line (exit 128 + 15); a build killed outright (SIGKILL) leaves a directory that the next build removes."""
    from dms_megatron.data.embedded import ensure_refit_data

    cache = tmp_path / "cache"
    env = dict(_env(), DMS_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dms_megatron.launch.refit", "logging.wandb=false",
                             f"hydra.run.dir={tmp_path / 'run'}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("building the re-fit data"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM before training started")
    assert "Traceback" not in err
    (lock,) = cache.glob("*.lock")
    assert sorted(p.name for p in cache.iterdir()) == [lock.name]  # no partial build, no finished one
    stale = cache / (lock.name[:-len(".lock")] + ".tmp-999999")
    stale.mkdir()
    said = []
    data = ensure_refit_data(cache_dir=str(cache), log=said.append)
    assert not stale.exists() and Path(data.train_prefix + ".bin").is_file()
    assert said[0].startswith("building the re-fit data once") and "left" in said[1] and "left" in said[2]


# ---- progress ----------------------------------------------------------------------------------------------------
def test_progress_is_plain_lines_with_rate_and_time_left_when_stdout_is_no_terminal(tmp_path):
    import io

    from dms_megatron.config import LoggingConfig, RefitConfig, TrainConfig
    from dms_megatron.training.logger import MetricsLogger

    cfg = RefitConfig(train=TrainConfig(steps=5), logging=LoggingConfig(wandb=False, log_interval=2))
    out = io.StringIO()
    log = MetricsLogger(tmp_path, cfg, start_step=0, stream=out)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0, "kd_loss": 0.5, "compression_loss": 0.1, "achieved_cr_train": 2.0,
                 "target_cr": 4.0, "tokens_per_s": 100.0})
    log.close()
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["2/5", "4/5", "5/5"]
    assert all("steps/s" in ln and "left" in ln for ln in lines)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


# ---- conversion --------------------------------------------------------------------------------------------------
def _convert(args, **kw):
    return subprocess.run([sys.executable, "-m", "dms_megatron.launch.convert", *args], env=_env(),
                          capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from convert_fixtures import make_hf_model, save_hf_model

    d = tmp_path_factory.mktemp("hf") / "qwen3"
    save_hf_model(make_hf_model("qwen3"), d)
    return d


def test_a_bad_tensor_parallel_import_is_one_line_before_any_rank(hf_dir, tmp_path):
    line = _one_error_line(_convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "m"),
                                     "--tp", "3"]))
    assert "--tp 3" in line and not (tmp_path / "m").exists()


def test_a_write_error_during_export_is_one_line_and_leaves_nothing(hf_dir, tmp_path):
    import resource

    assert _convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "m")]).returncode == 0
    limit = 64 * 1024  # the model is larger: the safetensors write hits the file-size limit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = _convert(["export", "--megatron-path", str(tmp_path / "m"), "--hf-path", str(tmp_path / "out"),
                  "--format", "plain"], preexec_fn=small_files)
    assert "writing" in _one_error_line(r) and "File too large" in r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_write_error_during_import_is_one_line_naming_the_limit_and_leaves_nothing(hf_dir, tmp_path):
    import resource

    limit = 64 * 1024  # the checkpoint's data file is larger

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = _convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "m")],
                 preexec_fn=small_files)
    line = _one_error_line(r)
    assert line.startswith(f"error: importing into {tmp_path / 'm'} failed: writing checkpoint")
    assert "files of at most 65,536 bytes (ulimit -f)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_carries_the_modeling_code_its_auto_map_names(hf_dir, tmp_path, megatron_single):
    from test_convert_roundtrip import _save_student

    from dms_megatron.config import DMSConfig

    assert _convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "m")]).returncode == 0
    _save_student(tmp_path / "m", tmp_path / "student", DMSConfig(window=4), [1])
    code = tmp_path / "code"
    code.mkdir()
    (code / "configuration_qwen3_dms.py").write_text("class Qwen3ConfigDMS: pass\n")
    base = ["export", "--megatron-path", str(tmp_path / "student"), "--format", "dms"]
    line = _one_error_line(_convert(base + ["--hf-path", str(tmp_path / "a"), "--modeling-code", str(code)]))
    assert "lacks modeling_qwen3_dms.py" in line and not (tmp_path / "a").exists()
    (code / "modeling_qwen3_dms.py").write_text("import dms_package_not_here\nfrom .configuration_qwen3_dms "
                                                "import Qwen3ConfigDMS\n")
    r = _convert(base + ["--hf-path", str(tmp_path / "b"), "--modeling-code", str(code)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "b" / "modeling_qwen3_dms.py").read_text() == (code / "modeling_qwen3_dms.py").read_text()
    assert "imports dms_package_not_here, which this environment lacks" in r.stderr
    r = _convert(base + ["--hf-path", str(tmp_path / "c")])
    assert r.returncode == 0 and "pass --modeling-code DIR" in r.stderr
    assert not (tmp_path / "c" / "modeling_qwen3_dms.py").exists()


def test_a_truncated_checkpoint_file_is_named(tmp_path, megatron_single):
    from conftest import tiny_model_config

    from dms_megatron.checkpoint import CheckpointError, load_model_weights, save_checkpoint
    from dms_megatron.megatron.model import build_gpt_model

    model = build_gpt_model(tiny_model_config(), None, seq_length=16)
    save_checkpoint(tmp_path, 1, model)
    (part,) = sorted((tmp_path / "iter_0000001").glob("*.distcp"))[:1]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"data file {part} \(\d+ bytes, needs \d+\) is truncated"):
        load_model_weights(tmp_path, build_gpt_model(tiny_model_config(), None, seq_length=16))


# ---- inference and plots ------------------------------------------------------------------------------------------
def test_generate_accepts_a_refit_run_dir_and_names_its_own_flags(assets, tmp_path):
    from refit_fixtures import run_refit

    from dms_megatron.config import RefitConfig
    from dms_megatron.launch.generate import main

    run_refit(RefitConfig.from_dict(refit_dict(assets, steps=1, save_interval=1)), tmp_path / "run", report=False)
    assert main(["--megatron", str(tmp_path / "run"), "--prompt-ids", "1 2 3", "--max-new-tokens", "2",
                 "--json"]) == 0
    r = subprocess.run([sys.executable, "-m", "dms_megatron.launch.generate", "--hf", str(tmp_path / "nope"),
                        "--prompt-ids", "1"], env=_env(), capture_output=True, text=True, timeout=300)
    assert _one_error_line(r) == f"error: --hf {tmp_path / 'nope'} does not exist"
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "dms_megatron.launch.generate", "--hf", str(tmp_path / "empty"),
                        "--prompt-ids", "1"], env=_env(), capture_output=True, text=True, timeout=300)
    assert _one_error_line(r).startswith(f"error: --hf {tmp_path / 'empty'}: ")


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

    from dms_megatron.config import RefitConfig
    from dms_megatron.training.report import run_figure, run_title

    cfg = RefitConfig()
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


def test_the_default_embedded_run_prepares(tmp_path):
    """The shipped teacher, its held-out items and the default config pass every pre-flight check."""
    r = _refit(["--prepare-only", f"hydra.run.dir={tmp_path / 'r'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert cfg["embedded"] is True and cfg["data"]["recall"] == "mqar"

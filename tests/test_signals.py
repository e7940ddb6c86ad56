"""Stop signals and progress through the real commands: Ctrl-C checkpoints at the next step and exits 4, a second
one aborts, a signal to the launcher of local ranks reaches every rank once, a stop during the data build leaves no
partial build, a lock wait names its holder, and progress is plain lines when stdout is no terminal."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import ROOT, env, refit, refit_overrides, start_refit, steps, wait_for_steps
from refit_fixtures import shared_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def test_ctrl_c_checkpoints_at_the_next_step_and_exits_4_then_resumes(assets, tmp_path):
    run = tmp_path / "run"
    proc = start_refit(assets, run)
    wait_for_steps(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    assert "received SIGINT: will checkpoint and stop after the current step" in out
    assert "Traceback" not in err
    done = steps(run)[-1]
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(done)
    again = refit(refit_overrides(assets, steps=done + 1, save_interval=1000, micro_batch_size=4, global_batch_size=16)
                   + [f"hydra.run.dir={run}", "resume.allow_changes=[train.steps]"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints'} at step {done}" in again.stdout
    assert steps(run) == list(range(1, done + 2))


def test_a_second_ctrl_c_aborts_at_once_in_one_line(assets, tmp_path):
    run = tmp_path / "run"
    proc = start_refit(assets, run)
    wait_for_steps(proc, run, 1)
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
    proc = start_refit(assets, run, **{"parallel.nproc_per_node": 2})
    wait_for_steps(proc, run, 1)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in ranks if "dms_megatron.launch.worker" in " ".join(p.cmdline())]) == 2
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    assert out.count(f"received {sig.name}: will checkpoint") == 1  # one acknowledgement for the job
    assert "Traceback" not in err
    done = steps(run)[-1]
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(done)
    psutil.wait_procs(ranks, timeout=30)
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


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
    build_env = dict(env(), DMS_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dms_megatron.launch.refit", "logging.wandb=false",
                             f"hydra.run.dir={tmp_path / 'run'}"], env=build_env, cwd=ROOT, stdout=subprocess.PIPE,
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


def test_progress_is_plain_lines_with_rate_and_time_left_when_stdout_is_no_terminal(tmp_path):
    import io

    from dms_megatron.config import TINY_TEACHER, LoggingConfig, RefitConfig, TrainConfig
    from dms_megatron.training.logger import MetricsLogger

    cfg = RefitConfig(TINY_TEACHER, train=TrainConfig(steps=5), logging=LoggingConfig(wandb=False, log_interval=2))
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

"""Trainer-side preemption safety (no cluster needed): a stop signal checkpoints the current step and exits with the
documented code, the resumed run equals an uninterrupted one, and all ranks agree on the stop step."""

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
from spawn_util import spawn_and_collect

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def _start_worker(run_dir: Path, cfg: dict) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-m", "dms_megatron.launch.worker", "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps_logged(run_dir: Path) -> int:
    p = run_dir / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def _metrics(run_dir: Path):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


KEYS = ("step", "loss", "kd_loss", "compression_loss", "evicted_fraction", "lr", "grad_norm")


def _catches(pid: int, sig) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt mask of /proc/PID/status)."""
    try:
        for ln in open(f"/proc/{pid}/status"):
            if ln.startswith("SigCgt:"):
                return bool(int(ln.split()[1], 16) >> (int(sig) - 1) & 1)
    except FileNotFoundError:
        pass
    return False


def _preempt(run: Path, cfg: dict, sig, after: int) -> int:
    """Start the worker, send ``sig`` once step ``after`` is logged; returns the checkpointed stop step."""
    from dms_megatron.checkpoint import latest_iteration
    from dms_megatron.training.preemption import PREEMPTED_EXIT_CODE

    p = _start_worker(run, cfg)
    deadline = time.time() + 300
    if after == 0:  # during start-up: as soon as the worker catches the signal, long before its first step
        while not _catches(p.pid, sig) and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert _steps_logged(run) == 0
    while _steps_logged(run) < after and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(sig)
    out, err = p.communicate(timeout=600)
    assert p.returncode == PREEMPTED_EXIT_CODE, (out[-1000:], err[-2000:])
    stopped = latest_iteration(run / "checkpoints")
    # stopped at a step boundary after the signal, before the end; nothing past that step was logged
    assert max(after, 1) <= stopped < STEPS, out
    if after == 0:
        assert stopped == 1, out  # a signal during start-up stops at the first boundary
    assert [m["step"] for m in _metrics(run)] == list(range(1, stopped + 1))
    assert f"received {sig.name}" in out and f"checkpoint of step {stopped} saved" in out
    assert not (run / "report.json").exists()  # a preempted run is not reported as finished
    return stopped


def test_signals_checkpoint_at_step_boundary_and_resume_is_bit_identical(assets, tmp_path):
    """USR1 (SLURM's warning signal) during start-up, resume, TERM (preemption/scancel) mid-run, resume == one
    uninterrupted run."""
    cfg = refit_dict(assets, steps=STEPS, save_interval=100, eval_batches=1, recall_eval_limit=1)
    full = _start_worker(tmp_path / "full", cfg)
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-2000:]

    run = tmp_path / "preempted"
    first = _preempt(run, cfg, signal.SIGUSR1, after=0)
    second = _preempt(run, cfg, signal.SIGTERM, after=first + 3)
    assert second > first
    resumed = _start_worker(run, cfg)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resumed from {run / 'checkpoints'} at step {second}" in out
    a, b = _metrics(tmp_path / "full"), _metrics(run)
    assert [[m[k] for k in KEYS] for m in a] == [[m[k] for k in KEYS] for m in b]
    assert json.loads((run / "report.json").read_text())["kl_to_teacher"] == \
        json.loads((tmp_path / "full" / "report.json").read_text())["kl_to_teacher"]


def _agree_worker(rank: int, world: int, port: int, q) -> None:
    import torch.distributed as dist

    from dms_megatron.training.preemption import PreemptionHandler

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    h = PreemptionHandler().install()
    seen = []
    for boundary in range(5):
        if rank == world - 1 and boundary == 2:
            signal.raise_signal(signal.SIGUSR1)  # only the last rank is signalled
        seen.append(h.requested())
    h.uninstall()
    dist.destroy_process_group()
    q.put((rank, seen))


@pytest.mark.parallel
def test_all_ranks_stop_at_the_same_boundary_when_one_is_signalled():
    got = spawn_and_collect(_agree_worker, 2, timeout=120)
    expected = [False, False, True, True, True]
    assert got == {0: expected, 1: expected}

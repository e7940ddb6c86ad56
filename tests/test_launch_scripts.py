"""The launch entry points beside slurm/: launch/torchrun.sh (multi-node bare metal / Kubernetes) and
launch/container.sh (a CUDA PyTorch container), exercised on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refit_fixtures import refit_dict, shared_assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def _env(**extra):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHON=sys.executable, **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.parallel
def test_torchrun_script_runs_a_prepared_two_rank_job(assets, tmp_path):
    d = refit_dict(assets, steps=2, save_interval=2)
    args = [f"model.{k}={v}" for k, v in d["model"].items() if v is not None] + ["embedded=false"]
    for section in ("train", "data", "dms"):
        args += [f"{section}.{k}={v}" for k, v in d[section].items() if v is not None]
    run = tmp_path / "run"
    prep = subprocess.run([sys.executable, "-m", "dms_megatron.launch.refit", "--prepare-only", *args,
                           "parallel.nproc_per_node=2", "logging.wandb=false", "logging.progress=false",
                           f"hydra.run.dir={run}"], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    r = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), str(run)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=_env(MASTER_PORT=str(29000 + os.getpid() % 1000)))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "node 0 of 1, 2 ranks each" in r.stdout
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "report.json").read_text())["steps"] == 2


def test_torchrun_script_refuses_a_run_dir_without_config(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), str(tmp_path)], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "--prepare-only" in r.stderr


def test_container_script_builds_the_docker_command():
    r = subprocess.run(["bash", str(ROOT / "launch" / "container.sh"), "dms-refit", "dms.final_cr=8"],
                       capture_output=True, text=True, timeout=60,
                       env=_env(DRY_RUN="1", IMAGE="nvcr.io/nvidia/pytorch:25.01-py3", MOUNTS="-v /data:/data"))
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip()
    for part in ("docker run --rm --gpus all --ipc=host", f"-v {ROOT}:/workspace/dms-megatron", "-v /data:/data",
                 "nvcr.io/nvidia/pytorch:25.01-py3", "pip\\ install\\ -q\\ -e\\ .", "dms-refit dms.final_cr=8"):
        assert part in cmd, (part, cmd)

"""Shared by the tests that drive the real commands in subprocesses: the environment, dms-refit / dms-convert runs,
the refit overrides of the shared test assets, the one-line error check and metrics polling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from refit_fixtures import refit_dict

ROOT = Path(__file__).resolve().parents[1]


def env():
    e = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT / "tests"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def launch(module: str, args, env_extra=None, timeout=900):
    """``python -m dms_megatron.launch.<module> ARGS`` from the repository root with the tests' environment."""
    return subprocess.run([sys.executable, "-m", f"dms_megatron.launch.{module}", *args],
                          env=dict(env(), **(env_extra or {})), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def refit(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dms_megatron.launch.refit", *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def refit_overrides(assets, **train):
    d = refit_dict(assets, **train)
    out = [f"model.{k}={v}" for k, v in d["model"].items() if v is not None] + ["embedded=false"]
    for section in ("train", "data", "dms"):
        out += [f"{section}.{k}={v}" for k, v in d[section].items() if v is not None]
    return out + ["logging.wandb=false", "logging.progress=false"]


def student_refit_overrides(assets, section: str = "refit") -> list:
    """The ``refit`` section of an evaluation launcher (under ``section``, e.g. ``eval.refit``) for 3-step students
    of the shared test assets."""
    r = section
    model = [f"{r}.model.{k}={v}" for k, v in assets["model"].items() if v is not None]
    return model + [
        f"{r}.embedded=false", f"{r}.train.init_checkpoint={assets['teacher']}",
        f"{r}.data.train_prefix={assets['train']}", f"{r}.data.valid_prefix={assets['valid']}",
        f"{r}.data.tokenizer={assets['tokenizer']}", f"{r}.data.recall_eval={assets['recall']}",
        f"{r}.train.steps=3", f"{r}.train.seq_length=64", f"{r}.train.micro_batch_size=2",
        f"{r}.train.global_batch_size=2", f"{r}.train.eval_batches=1", f"{r}.train.recall_eval_limit=2",
        f"{r}.train.warmup_steps=1", f"{r}.train.save_interval=3", f"{r}.dms.window=4", f"{r}.dms.final_step=2",
        f"{r}.logging.progress=false",
    ]


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def steps(run: Path):
    p = run / "metrics.jsonl"
    return [json.loads(ln)["step"] for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def start_refit(assets, run: Path, **extra):
    args = refit_overrides(assets, steps=400, save_interval=1000, micro_batch_size=4, global_batch_size=16)
    args += [f"{k}={v}" for k, v in extra.items()]
    return subprocess.Popen([sys.executable, "-m", "dms_megatron.launch.refit", *args, f"hydra.run.dir={run}"],
                            env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, run: Path, n: int, timeout=300):
    t0 = time.time()
    while len(steps(run)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def convert(args, **kw):
    return subprocess.run([sys.executable, "-m", "dms_megatron.launch.convert", *args], env=env(),
                          capture_output=True, text=True, timeout=600, **kw)

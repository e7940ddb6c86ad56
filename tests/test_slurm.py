"""SLURM jobs on a real one-node cluster (tools/slurm_localhost.sh brings one up on localhost as root):

- slurm/refit.sbatch re-fits the tiny model with 2 ranks (one task each) on CPU/gloo;
- preemption: a signal to the batch script -> checkpoint at the next step -> scontrol requeue -> the requeued job
  resumes in the same run dir -> the same metrics, bit for bit, as the uninterrupted job;
- a config that fails validation ends the job FAILED with its one-line error in the job log and no report;
- a 2 x 2 Hydra sweep (dms.final_cr x dms.window) through hydra-submitit-launcher's SLURM launcher, then
  dms-sweep-summary over it.

Skipped, with the reason, only where no cluster is reachable and none can be brought up (not root, no apt, bring-up
failed); DMS_REQUIRE_SLURM=1 (set by .ci/run) turns that skip into a failure.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from refit_fixtures import shared_assets

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
BRINGUP = ROOT / "tools" / "slurm_localhost.sh"
JOB_TIMEOUT = 600
REQUEUE_SETTLE = 3.0  # seconds between a requeue and its release (see _wait)
STEPS = 16            # preempted + uninterrupted runs (the signal must land well before the last step)
SWEEP_STEPS = 4
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
KEYS = ("step", "loss", "kd_loss", "compression_loss", "evicted_fraction", "lr", "grad_norm",
        "evicted_fraction/layer1", "evicted_fraction/layer2")


def _node_states() -> list:
    """The compact state of every node (sinfo %t: idle, mix, alloc, comp, ...); [] when no cluster answers."""
    if not shutil.which("sinfo"):
        return []
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return r.stdout.split() if r.returncode == 0 else []


def _cluster_idle() -> bool:
    return any(s in ("idle", "mix", "alloc") for s in _node_states())


@pytest.fixture(scope="session")
def slurm_cluster():
    """A reachable cluster: the running one, or one brought up here for the session (and torn down after)."""

    def unavailable(reason: str):
        if os.environ.get("DMS_REQUIRE_SLURM") == "1":
            pytest.fail(f"DMS_REQUIRE_SLURM=1 but no SLURM cluster: {reason}")
        pytest.skip(f"no SLURM cluster: {reason}")

    if _cluster_idle():
        yield
        return
    if os.geteuid() != 0:
        unavailable("none reachable, and bringing one up on localhost (tools/slurm_localhost.sh) needs root")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        unavailable("none reachable, SLURM is not installed and there is no apt-get to install it")
    r = subprocess.run(["bash", str(BRINGUP), "up"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        unavailable(f"tools/slurm_localhost.sh up failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    try:
        yield
    finally:
        subprocess.run(["bash", str(BRINGUP), "down"], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, slurm_cluster, megatron_single):
    return shared_assets(tmp_path_factory)


def _overrides(assets, steps: int) -> list:
    model = [f"model.{k}={v}" for k, v in assets["model"].items() if v is not None]
    return model + [
        "embedded=false", f"train.init_checkpoint={assets['teacher']}", f"data.train_prefix={assets['train']}",
        f"data.valid_prefix={assets['valid']}", f"data.tokenizer={assets['tokenizer']}",
        f"data.recall_eval={assets['recall']}", f"train.steps={steps}", "train.seq_length=64",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_batches=1", "train.save_interval=100",
        "train.recall_eval_limit=2", "train.warmup_steps=1", "logging.wandb=false", "dms.window=4",
        "dms.final_step=4", "dms.final_cr=2",
    ]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _submit(args: list, cwd: Path, **env) -> str:
    """slurm/submit.sh cpu-gloo ARGS (the CPU/gloo preset: 1 node, 2 tasks); returns the job id."""
    r = subprocess.run(["bash", str(ROOT / "slurm" / "submit.sh"), "cpu-gloo", *args], cwd=cwd, env=_env(**env),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[-1]


def _squeue(job: str) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else ""


def _jobcomp(job: str) -> dict:
    """The last job-completion record of ``job`` (JobCompType=jobcomp/filetxt keeps states after squeue forgets)."""
    loc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    path = next(ln.split("=", 1)[1].strip() for ln in loc.splitlines() if ln.startswith("JobCompLoc"))
    recs = [dict(kv.split("=", 1) for kv in ln.split() if "=" in kv) for ln in Path(path).read_text().splitlines()]
    array, _, task = job.partition("_")  # array task "A_T": its own JobId, ArrayJobId=A ArrayTaskId=T
    recs = [r for r in recs if (r.get("ArrayJobId"), r.get("ArrayTaskId")) == (array, task)] if task else \
        [r for r in recs if r.get("JobId") == job]
    return recs[-1] if recs else {}


def _node_idle() -> bool:
    states = _node_states()
    return bool(states) and all(t == "idle" for t in states)


def _wait(job: str, *, on_pending_requeue=None, timeout=JOB_TIMEOUT) -> dict:
    """Poll until the job has a terminal completion record; a requeued job waiting for its BeginTime (SLURM holds
    requeued jobs ~2 min) is released once it is safe to (REQUEUE_SETTLE). Cancels the job on timeout."""
    deadline = time.time() + timeout
    held_since = None
    while time.time() < deadline:
        q = _squeue(job)
        held = q.startswith("PENDING") and "BeginTime" in q
        held_since = (held_since or time.time()) if held else None  # a later requeue starts its own clock
        if held:
            # slurmd refuses a batch launch whose credential is not newer (in whole seconds) than the kill of the
            # previous run ("Job N already killed, do not launch batch job" -> FAILED): release only once the
            # node is idle again and the requeue is over REQUEUE_SETTLE seconds old
            if time.time() - held_since >= REQUEUE_SETTLE and _node_idle():
                if on_pending_requeue:
                    on_pending_requeue()
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True,
                               timeout=30)
        if not q or q.split()[0] in TERMINAL:
            rec = _jobcomp(job)
            if rec.get("JobState") in TERMINAL:
                return rec
        time.sleep(0.5)
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    pytest.fail(f"job {job} did not finish in {timeout}s (cancelled)")


def _metrics(run_dir: Path) -> list:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """One sbatch re-fit, default run dir (runs/slurm/<job name>-<job id> under the submit dir)."""
    cwd = tmp_path_factory.mktemp("slurm-refit")
    job = _submit(_overrides(assets, STEPS), cwd)
    rec = _wait(job)
    return job, rec, cwd, cwd / "runs" / "slurm" / f"dms-refit-{job}"


def test_sbatch_refit_two_ranks_on_cpu(uninterrupted):
    job, rec, cwd, run = uninterrupted
    out = (cwd / f"dms-refit-{job}.out").read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0" and rec["ProcCnt"] == "2", (rec, out)
    assert f"run dir {run}; 2 ranks on 1 node(s)" in out and f"finished: {run}/report.json" in out
    log = (run / "logs" / f"slurm-{job}.log").read_text()
    # srun --label: rank 0 logs progress and writes the report; the other rank stays quiet
    assert "0: report: " in log and f"0: step {STEPS}/{STEPS}" in log
    assert "1: report: " not in log and "1: step" not in log
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == STEPS and report["target_cr"] == 2
    assert [m["step"] for m in _metrics(run)] == list(range(1, STEPS + 1))
    assert json.loads((run / "status.json").read_text())["state"] == "COMPLETED"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == STEPS and cfg["logging"]["progress"] is False


def test_preemption_signal_checkpoint_requeue_resume(assets, uninterrupted, tmp_path):
    _, _, _, reference = uninterrupted
    run = tmp_path / "run"
    job = _submit(_overrides(assets, STEPS), tmp_path, RUN_DIR=str(run))
    deadline = time.time() + JOB_TIMEOUT
    while not ((run / "metrics.jsonl").exists() and len(_metrics(run)) >= 2) and time.time() < deadline:
        time.sleep(0.1)
    # what --signal=B:USR1@SECS does before the time limit: SIGUSR1 to the batch script only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    requeued = []
    rec = _wait(job, on_pending_requeue=lambda: requeued.append(
        int((run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())))
    out = (tmp_path / f"dms-refit-{job}.out").read_text()
    assert rec["JobState"] == "COMPLETED", (rec, out)
    assert requeued, out
    stopped = requeued[0]
    assert 2 <= stopped < STEPS, out
    assert "received SIGUSR1" in out and f"preempted (SIGUSR1): checkpoint {stopped} saved" in out
    assert f"requeueing job {job}" in out and "restart 1] requeued: resuming with" in out
    log = (run / "logs" / f"slurm-{job}.log").read_text()
    assert f"0: resumed from {run / 'checkpoints'} at step {stopped}" in log
    for rank in (0, 1):  # every rank got the signal through srun and stopped at the same step
        assert f"{rank}: preempted (SIGUSR1): checkpoint of step {stopped} saved" in log
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "COMPLETED" and status["restarts"] == 1
    a, b = _metrics(reference), _metrics(run)
    assert [[m[k] for k in KEYS] for m in a] == [[m[k] for k in KEYS] for m in b]
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (reference, run))
    assert (ra["kl_to_teacher"], ra["achieved_cr"]) == (rb["kl_to_teacher"], rb["achieved_cr"])


@pytest.mark.parametrize("override,needle", [
    ("dms.final_cr=0.5", "dms.final_cr=0.5"),                                  # dataclass validation (prepare)
    ("foo.bar=1", "unknown key 'foo.bar'"),                                    # Hydra: unknown key (prepare)
    ("data.train_prefix=/nonexistent/train", "/nonexistent/train.bin does not exist"),  # the ranks' input check
])
def test_bad_config_fails_the_job_with_one_line_error(assets, tmp_path, override, needle):
    run = tmp_path / "bad"
    job = _submit(_overrides(assets, STEPS) + [override], tmp_path, RUN_DIR=str(run))
    rec = _wait(job)
    out = (tmp_path / f"dms-refit-{job}.out").read_text()
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] != "0:0", (rec, out)
    errors = [ln for ln in out.splitlines() if "error: " in ln]
    assert len(errors) == 1 and needle in errors[0], out
    log = (run / "logs" / f"slurm-{job}.log").read_text()
    assert needle in log and "Traceback" not in log
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "FAILED" and status["exit_code"] == int(rec["ExitCode"].split(":")[0]) != 0
    assert not (run / "report.json").exists() and not (run / "checkpoints").exists()
    r = subprocess.run([sys.executable, "-m", "dms_megatron.launch.summary", str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env=_env())
    assert r.returncode == 1 and "not finished: bad" in r.stderr  # not reported as finished


def test_hydra_sweep_through_submitit_slurm_launcher(assets, tmp_path):
    cmd = [sys.executable, "-m", "dms_megatron.launch.refit", "-m", "hydra/launcher=submitit_slurm",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
           *_overrides(assets, SWEEP_STEPS), "dms.final_cr=2,3", "dms.window=4,8", "logging.progress=false"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    sweeps = list((tmp_path / "runs" / "sweep").iterdir())
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    points = {}
    for d in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        points[(cfg["dms"]["final_cr"], cfg["dms"]["window"])] = d
        assert (d / "report.json").is_file() and len(_metrics(d)) == SWEEP_STEPS
    assert sorted(points) == [(2.0, 4), (2.0, 8), (3.0, 4), (3.0, 8)]
    # each point ran as its own SLURM job (submitit job array): its own folder, log and completion record
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(jobs) == 4, jobs
    for j in jobs:  # submitit returns once the result files exist; the job may still be finishing
        assert _wait(j, timeout=120)["JobState"] == "COMPLETED", (j, _jobcomp(j))

    s = subprocess.run([sys.executable, "-m", "dms_megatron.launch.summary", str(sweep)], capture_output=True,
                       text=True, timeout=120, env=_env())
    assert s.returncode == 0, s.stderr
    rows = {(float(x["final_cr"]), int(x["window"])): x for x in csv.DictReader(open(sweep / "summary.csv"))}
    assert sorted(rows) == sorted(points)
    for key, d in points.items():
        rep = json.loads((d / "report.json").read_text())
        assert rows[key]["state"] == "FINISHED"
        assert float(rows[key]["achieved_cr"]) == rep["achieved_cr"]
        assert float(rows[key]["kl_to_teacher"]) == rep["kl_to_teacher"]
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_convert_jobs_import_then_export_round_trip(tmp_path, slurm_cluster):
    """slurm/convert.sbatch: HF -> Megatron (tp=2: two processes inside the job) -> HF gives back the same tensors."""
    from safetensors.torch import load_file

    from convert_fixtures import make_hf_model, save_hf_model

    save_hf_model(make_hf_model("llama"), tmp_path / "hf")
    jobs = {}
    for verb, env in (("import", dict(HF_MODEL=str(tmp_path / "hf"), MEGATRON_PATH=str(tmp_path / "mg"), TP="2")),
                      ("export", dict(MEGATRON_PATH=str(tmp_path / "mg"), HF_PATH=str(tmp_path / "back"),
                                      FORMAT="plain"))):
        r = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", str(ROOT / "slurm" / "convert.sbatch")],
                           cwd=tmp_path, env=_env(VERB=verb, **env), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        jobs[verb] = job = r.stdout.strip()
        rec = _wait(job)
        out = (tmp_path / f"dms-convert-{job}.out").read_text()
        assert rec["JobState"] == "COMPLETED", (rec, out)
        assert f"dms-convert {verb}: wrote" in out
        assert (tmp_path / "runs" / "slurm" / f"dms-convert-{job}" / f"convert-{job}.log").is_file()
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def test_sbatch_refit_from_a_megatron_lm_checkpoint_on_a_blend(assets, tmp_path):
    """The README walk-through's sbatch step: a re-fit from a Megatron-LM checkpoint on a weighted blend."""
    import mlm_fixtures
    from dms_megatron.megatron.distributed import init_process_groups

    try:
        w = mlm_fixtures.walkthrough_inputs(tmp_path, assets)
    finally:
        init_process_groups(1, 1, seed=1234)
    for name in ("a", "b"):
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", w[name],
                            "--tokenizer", assets["tokenizer"], "--output-prefix", f"{w['data']}/{name}",
                            "--workers", "2", "--append-eod"], env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    job = _submit(mlm_fixtures.walkthrough_overrides(assets, w), tmp_path)
    rec = _wait(job)
    run = tmp_path / "runs" / "slurm" / f"dms-refit-{job}"
    assert rec["JobState"] == "COMPLETED", (rec, (tmp_path / f"dms-refit-{job}.out").read_text())
    assert json.loads((run / "report.json").read_text())["steps"] == 2

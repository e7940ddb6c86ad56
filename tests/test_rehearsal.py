"""Production rehearsal: the path of `sbatch slurm/refit.sbatch model=qwen3-8b dms=paper train=paper
parallel=h100_256` (tp 8 x pp 2, sequence parallel, distributed optimizer, bf16) on a mini Qwen3 and 16 gloo ranks.

`dms-convert import --tp 8 --pp 2` of a transformers model -> `dms-refit` at tp 8 x pp 2 -> SIGTERM after a few
steps (exit 4, checkpoint of that step) -> resume at tp 2 x pp 1 x dp 2 -> the last step and its report ->
`dms-convert export RUN` -> transformers. Two references at tp 1: the same job uninterrupted from the HF directory
itself (its per-step KD checks the tp 8 x pp 2 import and first half), and the SIGTERM checkpoint resumed at tp 1
(a copy of the run dir) for the last step, whose report, resumed step and exported logits are compared with the
tp 2 x dp 2 run's.

Why the logits are compared after one step from the same checkpoint, not after two whole runs: a DMS re-fit's
trajectory is chaotic. The q-neuron's decision logit is 100 q - 5 with q after the q-norm (|q| ~ 1), so bf16's
quantum of q moves it by 0.4-0.8, several times the Gumbel-sigmoid's tau = 0.1: which tokens sit on a decision's
boundary, and so the straight-through gradient that reaches every layer below it, differs between layouts from the
first step. Measured (tp 1 vs tp 2 of this job, `train.lr=3e-3`): after 6 steps from the same start the two
students' logits differ by 1.37x the logits' max and by as much as either differs from the teacher (bf16), and by
0.69x the max in fp32, where the first 3 steps agree to 5 digits and the evicted fractions part at step 4 (0.4366
vs 0.4369). Even one step from one checkpoint is chaotic in its gradient: the two layouts' step-5 gradient norms
were 8.2 and 14.5 (before clipping to 1). What keeps one step close is Adam: both resumptions load the same moments,
and one new gradient is a bounded share of them (1 - beta1 over the bias correction, 24% at step 5, less later), so
even unrelated gradients cannot part the two updates by more than about half a step.

So the run is stopped one step before its end and both resumptions take exactly one step (`train.steps` = the
stop + 1). The SIGTERM reaches the ranks during step STOP_AFTER + 1 (checkpoint of that step) or, when their stop
check of step STOP_AFTER has not run yet, before it (checkpoint of STOP_AFTER); both happen, so the resumed step is
step 6 or step 5. What each check can promise:
- the checkpoint loads as the same model at tp 2 x dp 2 and at tp 1: the resumed step's KD (the forward of the
  loaded weights, before the update) agrees within RESUMED_KD_REL (float noise of TP sums and the few decisions it
  flips; measured 2.5e-4 relative resuming step 5, 7e-5 resuming step 6);
- the exported logits of the two resumptions differ by at most LAYOUT_OF_STEP times the resumed step's own change
  of them (measured 0.53 of it when step 5 is resumed, a step with a large gradient, and 0.012 when step 6 is),
  while the re-fit's change of them is at least REFIT_OVER_LAYOUT times larger (measured 17x and 400x), so two
  untrained copies of the teacher could not pass, nor could a wrongly resharded weight (a change of the logits'
  own size); the step itself must move them by at least STEP_MIN of their max (measured 0.13 and 0.26), or the
  bound says nothing.

Other tolerances: KD_STEP1_REL compares the first step of the tp 8 x pp 2 run with tp 1 (the same weights, bf16
sums in another order); later steps of the first half only within KD_REL (the chaos above). REPORT_REL: held-out KL
and achieved CR of the two resumed runs (one step apart from one checkpoint). Measured values: docs/architecture.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from convert_fixtures import make_hf_model, save_hf_model
from refit_fixtures import build_data_assets

# At 16 ranks and minutes per run it is not in the default run; CI's scale step (`-m scale`) runs it.
pytestmark = [pytest.mark.scale, pytest.mark.parallel]

ROOT = Path(__file__).resolve().parents[1]

# The mini Qwen3: q/k RMSNorm, GQA 16 query / 8 KV heads (Qwen3-8B: 32 / 8; tp 8 holds 2 query heads and 1 KV head
# per rank), SwiGLU, untied embeddings (as Qwen3-8B), head dim decoupled from hidden / heads, 4 layers (2 per stage),
# a vocabulary of 320 that is padded (to a multiple of 128, or of 128 x tp).
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4, 64, 128, 16, 8, 16, 320
SEQ, MICRO, GLOBAL, STEPS, STOP_AFTER = 64, 2, 4, 6, 4
LR = 3e-3

LAYOUT_OF_STEP = 1.0     # max |logits(tp 2 x dp 2) - logits(tp 1)| / max |logits(tp 1) - logits(checkpoint)|
REFIT_OVER_LAYOUT = 10.0  # max |logits(tp 1) - logits(teacher)| / max |logits(tp 2 x dp 2) - logits(tp 1)|
STEP_MIN = 0.02          # max |logits(tp 1) - logits(checkpoint)| / max |logits(tp 1)|: the resumed step moved them
RESUMED_KD_REL = 0.01    # the resumed step's KD (forward of the loaded checkpoint), tp 2 x dp 2 against tp 1
KD_STEP1_REL = 0.03      # step 1's KD (nats/token), tp 8 x pp 2 against tp 1 from the HF directory
KD_REL, KD_ABS = 0.3, 1e-3  # the first half's later steps (chaotic, see the docstring)
REPORT_REL = 0.05        # held-out KL and achieved CR, the two resumptions
STDERR_BUDGET = 4096  # bytes of launcher stderr a healthy 16-rank command may print
PER_RANK_FLOOD = ("common state dict differs",)

T_IMPORT, T_REFIT, T_RESUME, T_REF = 420, 600, 420, 300


def _env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(args, timeout: int) -> subprocess.CompletedProcess:
    cmd = ["timeout", "-k", "30", str(timeout), sys.executable, *args]
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True)


def mini_qwen3(path: Path) -> None:
    """A random transformers Qwen3ForCausalLM built from its config (no download), saved as safetensors."""
    save_hf_model(make_hf_model("qwen3", seed=0, num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=FFN,
                                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                                vocab_size=VOCAB, max_position_embeddings=SEQ * 4, tied=False), path)


def refit_overrides(data: dict, init: Path, run_dir: Path) -> list:
    return [
        "embedded=false", "model.family=qwen3", f"model.num_layers={LAYERS}", f"model.hidden_size={HIDDEN}",
        f"model.ffn_hidden_size={FFN}", f"model.num_attention_heads={HEADS}", f"model.num_query_groups={KV_HEADS}",
        f"model.kv_channels={HEAD_DIM}", f"model.vocab_size={VOCAB}", "model.qk_layernorm=true",
        "model.tie_embeddings=false", f"model.max_position_embeddings={SEQ * 4}",
        f"train.init_checkpoint={init}", f"data.train_prefix={data['train']}",
        f"data.valid_prefix={data['valid']}", f"data.tokenizer={data['tokenizer']}",
        f"data.recall_eval={data['recall']}",
        "dms=paper", "dms.window=8", "dms.final_cr=2", "dms.final_step=4",
        f"train.steps={STEPS}", f"train.seq_length={SEQ}", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={GLOBAL}", f"train.lr={LR}", f"train.min_lr={LR / 10}", "train.warmup_steps=1",
        "train.precision=bf16", "train.distributed_optimizer=true", "train.save_interval=100",
        "train.eval_interval=0", "train.eval_batches=2", "train.recall_eval_limit=4",
        "logging.progress=false", "logging.wandb=false", f"hydra.run.dir={run_dir}",
    ]


def metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def refit_until_step(args: list, run_dir: Path, step: int, timeout: int):
    """Start `dms-refit`, SIGTERM the launcher (only it: it forwards the signal to its ranks) once ``step`` is in
    metrics.jsonl; returns (exit status, stderr)."""
    err_path = run_dir.parent / f"{run_dir.name}.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dms_megatron.launch.refit", *args], env=_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + timeout
        try:
            while proc.poll() is None and len(metrics(run_dir)) < step and time.time() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, f"dms-refit ended (exit {proc.returncode}) before step {step}"
            assert time.time() < deadline, f"dms-refit did not reach step {step} within {timeout} s"
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, err_path.read_text()


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    with torch.no_grad():
        return model(ids).logits


def assert_quiet(stderr: str, what: str) -> None:
    """No per-rank warning flood in a launcher's stderr: none of the known ones, no line printed by 4 or more
    ranks alike (a warning of every rank of 16), and a small size in all."""
    for needle in PER_RANK_FLOOD:
        assert needle not in stderr, f"{what}: stderr repeats per-rank warnings ({needle!r}):\n{stderr[-3000:]}"
    repeated = {ln: n for ln, n in Counter(ln for ln in stderr.splitlines() if ln.strip()).items() if n >= 4}
    assert not repeated, f"{what}: lines repeated by the ranks: {repeated}"
    assert len(stderr.encode()) <= STDERR_BUDGET, f"{what}: {len(stderr)} bytes of stderr:\n{stderr[-3000:]}"


def export_plain(run_dir: Path, out: Path, iteration: int | None = None) -> None:
    from dms_megatron.launch.convert import main as convert

    # `--megatron-path RUN`: a run dir, as the README writes it (its checkpoints/ are found)
    extra = [] if iteration is None else ["--iteration", str(iteration)]
    assert convert(["export", "--megatron-path", str(run_dir), "--hf-path", str(out), "--format", "plain", *extra]) == 0


def refit(args: list, timeout: int) -> subprocess.CompletedProcess:
    return _run(["-m", "dms_megatron.launch.refit", *args], timeout)


REPORT_KEYS = ("target_cr", "achieved_cr", "kl_to_teacher", "teacher_recall_acc", "student_recall_acc", "steps",
               "tokens_per_s")
TP8PP2 = ["parallel.tp=8", "parallel.pp=2", "parallel.sequence_parallel=true"]
TP2DP2 = ["parallel.tp=2", "parallel.pp=1", "parallel.nproc_per_node=4", "parallel.sequence_parallel=true"]


def test_production_rehearsal(tmp_path):
    data = build_data_assets(tmp_path / "data", recall_items=4)
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    mini_qwen3(hf)
    imp = _run(["-m", "dms_megatron.launch.convert", "import", "--hf-model", str(hf), "--megatron-path",
                str(imported), "--tp", "8", "--pp", "2", "--dtype", "bfloat16"], T_IMPORT)
    assert imp.returncode == 0, imp.stderr[-3000:]

    run, ref_resume = tmp_path / "run", tmp_path / "ref-resume"
    common = refit_overrides(data, imported, run)
    rc, stopped_err = refit_until_step(common + TP8PP2, run, STOP_AFTER, T_REFIT)
    stopped = len(metrics(run))
    assert rc == 4, stopped_err[-3000:]
    assert STOP_AFTER <= stopped < STEPS and not (run / "report.json").exists()
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    shutil.copytree(run, ref_resume)  # the same checkpoint, to be resumed at tp 1
    last = stopped + 1  # one step after the checkpoint: STEPS when it is step 5, 5 when it is step 4
    tail = [f"train.steps={last}", "resume.allow_changes=[train.steps]"]
    resumed = refit(common + TP2DP2 + tail, T_RESUME)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one_resumed = refit(refit_overrides(data, imported, ref_resume) + tail, T_REF)
    assert one_resumed.returncode == 0, one_resumed.stderr[-3000:]
    report, ref_report = (json.loads((d / "report.json").read_text()) for d in (run, ref_resume))
    assert all(k in report for k in REPORT_KEYS) and report["steps"] == last and report["target_cr"] == 2

    ref = tmp_path / "ref"  # the same job at tp 1, uninterrupted, from the HF directory itself
    one = refit(refit_overrides(data, hf, ref), T_REF)
    assert one.returncode == 0, one.stderr[-3000:]
    compare_first_half(run, ref, stopped)
    resumed_kd, ref_kd = metrics(run)[-1]["kd_loss"], metrics(ref_resume)[-1]["kd_loss"]
    assert resumed_kd == pytest.approx(ref_kd, rel=RESUMED_KD_REL), (last, resumed_kd, ref_kd)
    for key in ("achieved_cr", "kl_to_teacher"):
        assert report[key] == pytest.approx(ref_report[key], rel=REPORT_REL), (key, report, ref_report)
    compare_exports(tmp_path, run, ref_resume, hf, stopped)
    assert_quiet(imp.stderr, "dms-convert import --tp 8 --pp 2")
    assert_quiet(stopped_err, "dms-refit at tp 8 x pp 2")
    assert_quiet(resumed.stderr, "dms-refit resumed at tp 2 x dp 2")


def compare_first_half(run: Path, ref: Path, stopped: int) -> None:
    """Per-step KD of the tp 8 x pp 2 steps (the interrupted run's metrics) against the uninterrupted tp 1 run."""
    a, b = metrics(run), metrics(ref)
    assert [m["step"] for m in a] == list(range(1, stopped + 2)) and [m["step"] for m in b] == list(range(1, STEPS + 1))
    assert a[0]["kd_loss"] == pytest.approx(b[0]["kd_loss"], rel=KD_STEP1_REL), (a[0], b[0])
    for x, y in zip(a[1:stopped], b[1:stopped]):
        assert x["kd_loss"] == pytest.approx(y["kd_loss"], rel=KD_REL, abs=KD_ABS), (x["step"], x, y)


def compare_exports(tmp_path: Path, run: Path, ref: Path, hf: Path, stopped: int) -> None:
    """The two resumptions' exports against each other, against the checkpoint both resumed from and the teacher."""
    export_plain(run, tmp_path / "export-run")
    export_plain(ref, tmp_path / "export-ref")
    export_plain(ref, tmp_path / "export-stop", iteration=stopped)
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    got, want, at_stop, teacher = (hf_logits(p, ids) for p in (tmp_path / "export-run", tmp_path / "export-ref",
                                                               tmp_path / "export-stop", hf))
    scale = float(want.abs().max())
    layout = float((got - want).abs().max())
    step = float((want - at_stop).abs().max())
    refit_change = float((want - teacher).abs().max())
    print(f"logits: scale {scale:.4g}, |tp8pp2->tp2dp2 - tp1| {layout:.4g}, resumed step {step:.4g}, "
          f"|tp1 - teacher| {refit_change:.4g}")
    assert step >= STEP_MIN * scale, (step, scale)
    assert layout <= LAYOUT_OF_STEP * step, (layout, step)
    assert refit_change >= REFIT_OVER_LAYOUT * layout, (refit_change, layout)

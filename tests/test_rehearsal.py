"""Production rehearsal: the path of `sbatch slurm/refit.sbatch model=qwen3-8b dms=paper train=paper
parallel=h100_256` (tp 8 x pp 2, sequence parallel, distributed optimizer, bf16) on a mini Qwen3 and 16 gloo ranks.

`dms-convert import --tp 8 --pp 2` of a transformers model -> `dms-refit` at tp 8 x pp 2 -> SIGTERM after a few
steps (exit 4, checkpoint of that step) -> resume at tp 2 x pp 1 x dp 2 -> the end and its report ->
`dms-convert export` -> transformers. The same job run at tp 1 without interruption (initialised from the HF
directory itself, so the tp 8 x pp 2 import is checked too) is exported the same way; the two students' logits
must agree, and differ from the teacher's by far more than they differ from each other.

Tolerances: both runs compute in bf16 (parameters, activations, pipeline messages) with fp32 main parameters and
Adam state. tp 8 and tp 1 sum the same products in different orders, so activations differ by bf16 rounding
(relative 2^-8 = 0.004 per operation), and Adam's first steps move every weight by about lr whatever its
gradient's size, so a rounding-level difference in a tiny gradient can become an lr-sized weight difference.
LAYOUT_TOL bounds the logits' difference relative to their scale; REFIT_OVER_LAYOUT asks the re-fit's own change
of the logits (student vs teacher, at tp 1) to be that many times larger, so a test that compared two untrained
copies of the teacher could not pass. The values and what was measured are in the README's "Parallel layouts".

Measured (without the distributed optimizer, whose checkpoint did not save then; it does now, not re-measured
here): the logits comparison FAILS as the job is set up now: max |layout difference| 0.85 against the logits' max
0.76 and the re-fit's own change 0.89 (mean 0.16 / 0.15 / 0.16): after 6 bf16 Adam steps at LR 3e-3 the two
students differ as much as either differs from the teacher. The random teacher gives KD gradients near zero (the
student starts as the teacher) and the q-neuron's decision logit (x 100 - 5) flips hard decisions on bf16 rounding,
so the gradients are noise-dominated. To be decided: a setting in which the re-fit's signal dominates (e.g. a
target CR far from what the initial decisions give, fewer / smaller steps), or fp32 for the logits comparison.
"""

from __future__ import annotations

import json
import os
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

# Open (the rehearsal does not pass yet): the cross-layout logits comparison is noise-dominated as set up (see the
# docstring). The distributed optimizer's checkpoint, which did not save with megatron-core 0.16's default layout
# ("ShardedTensor.flattened_range is not supported"), is saved in train.dist_optim_sharding's layout now (default
# fully_reshardable: loads at any layout, so the tp 8 x pp 2 save can resume at tp 2 x dp 2), tested at dp 2 in
# tests/test_parallel_checkpoint.py (resumed bit for bit, loaded at tp 2 and at one rank); this rehearsal has not
# been re-run with it. Until the logits are settled it is an expected failure (strict: a pass is reported as a
# failure, so the marker cannot outlive the fix) and, at 16 ranks and minutes per run, it is left out of CI's scale
# step (`-m "scale and not slow"`); run it with `pytest -m scale`.
pytestmark = [pytest.mark.scale, pytest.mark.parallel, pytest.mark.slow,
              pytest.mark.xfail(strict=True, raises=AssertionError,
                                reason="open: cross-layout logits tolerance (distributed-optimizer checkpoints: fixed, "
                                       "not re-run here)")]

ROOT = Path(__file__).resolve().parents[1]

# The mini Qwen3: q/k RMSNorm, GQA 16 query / 8 KV heads (Qwen3-8B: 32 / 8; tp 8 holds 2 query heads and 1 KV head
# per rank), SwiGLU, untied embeddings (as Qwen3-8B), head dim decoupled from hidden / heads, 4 layers (2 per stage),
# a vocabulary of 320 that is padded (to a multiple of 128, or of 128 x tp).
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4, 64, 128, 16, 8, 16, 320
SEQ, MICRO, GLOBAL, STEPS, STOP_AFTER = 64, 2, 4, 6, 3
LR = 3e-3

LAYOUT_TOL = 0.05        # max |logits(tp 8 x pp 2 -> tp 2 x dp 2) - logits(tp 1)| / max |logits(tp 1)|
REFIT_OVER_LAYOUT = 3.0  # max |logits(tp 1) - logits(teacher)| / max |logits(layout) - logits(tp 1)|
# per-step KD (nats/token) of the two runs; measured without the distributed optimizer: steps 1-2 within 1.2%, then
# 10% and 14% at steps 3 and 4, where the KD jumps from 0.002 to 0.025 (the decisions' hard flips differ)
KD_REL, KD_ABS = 0.3, 1e-3
REPORT_REL = 0.3         # held-out KL and achieved CR of the two reports (the same 6-step drift)
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


def export_plain(run_dir: Path, out: Path) -> None:
    from dms_megatron.launch.convert import main as convert

    # `--megatron-path RUN/checkpoints`: the checkpoint directory of a run (the run dir itself may be accepted too)
    assert convert(["export", "--megatron-path", str(run_dir / "checkpoints"), "--hf-path", str(out),
                    "--format", "plain"]) == 0


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

    run = tmp_path / "run"
    common = refit_overrides(data, imported, run)
    rc, stopped_err = refit_until_step(common + TP8PP2, run, STOP_AFTER, T_REFIT)
    stopped = len(metrics(run))
    assert rc == 4, stopped_err[-3000:]
    assert STOP_AFTER <= stopped < STEPS and not (run / "report.json").exists()
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)
    resumed = refit(common + TP2DP2, T_RESUME)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert all(k in report for k in REPORT_KEYS) and report["steps"] == STEPS and report["target_cr"] == 2

    ref = tmp_path / "ref"  # the same job at tp 1, uninterrupted, from the HF directory itself
    one = refit(refit_overrides(data, hf, ref), T_REF)
    assert one.returncode == 0, one.stderr[-3000:]
    compare_runs(run, ref, report, json.loads((ref / "report.json").read_text()))
    compare_exports(tmp_path, run, ref, hf)
    assert_quiet(imp.stderr, "dms-convert import --tp 8 --pp 2")
    assert_quiet(stopped_err, "dms-refit at tp 8 x pp 2")
    assert_quiet(resumed.stderr, "dms-refit resumed at tp 2 x dp 2")


def compare_runs(run: Path, ref: Path, report: dict, ref_report: dict) -> None:
    """Per-step KD and the held-out report of the interrupted, re-laid-out run against the tp 1 run."""
    a, b = metrics(run), metrics(ref)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["kd_loss"] == pytest.approx(y["kd_loss"], rel=KD_REL, abs=KD_ABS), (x["step"], x, y)
    for key in ("achieved_cr", "kl_to_teacher"):
        assert report[key] == pytest.approx(ref_report[key], rel=REPORT_REL), (key, report, ref_report)


def compare_exports(tmp_path: Path, run: Path, ref: Path, hf: Path) -> None:
    export_plain(run, tmp_path / "export-run")
    export_plain(ref, tmp_path / "export-ref")
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    got, want, teacher = (hf_logits(p, ids) for p in (tmp_path / "export-run", tmp_path / "export-ref", hf))
    scale = float(want.abs().max())
    layout = float((got - want).abs().max())
    refit_change = float((want - teacher).abs().max())
    print(f"logits: scale {scale:.4g}, |tp8pp2->tp2dp2 - tp1| {layout:.4g}, |tp1 - teacher| {refit_change:.4g}")
    assert layout <= LAYOUT_TOL * scale, (layout, scale)
    assert refit_change >= REFIT_OVER_LAYOUT * layout, (refit_change, layout)

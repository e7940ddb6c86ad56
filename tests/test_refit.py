"""End-to-end re-fit on a 2-layer model: CR reached, resume after SIGKILL is bit-identical, error paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refit_fixtures import refit_dict, run_refit, shared_assets

ROOT = Path(__file__).resolve().parents[1]
E2E_STEPS = 30
TARGET_CR = 2.0
TEACHER_INIT_STD = 0.1


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    # init std 0.1 (not 0.02): attention is peaked enough that evicting the wrong tokens costs KD, which is what
    # stops the one-sided compression loss from over-evicting (a near-uniform random teacher gives no pressure).
    return shared_assets(tmp_path_factory, init_std=TEACHER_INIT_STD)


def _worker(run_dir: Path, cfg: dict, fault=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT / "tests"))
    env.pop("RANK", None)
    extra = ["--inject-fault", fault] if fault else []
    return subprocess.run([sys.executable, "-m", "dms_megatron.launch.worker", "--run-dir", str(run_dir), *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def _metrics(run_dir: Path):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_short_refit_reaches_target_cr(assets, tmp_path):
    from dms_megatron.config import RefitConfig

    d = refit_dict(assets, steps=E2E_STEPS, save_interval=E2E_STEPS, eval_batches=4, lr=1e-3, min_lr=1e-4)
    d["dms"].update(final_cr=TARGET_CR, final_step=E2E_STEPS // 2, alpha_source="adapter")
    report = run_refit(RefitConfig.from_dict(d), tmp_path)
    # The zero-initialised adapter starts at CR 1 (logit -5: nothing evicted), so reaching the target is the
    # compression loss's work (the default band loss, CR x (1 -/+ 0.05)). Held-out data under hard decisions is
    # compressed a little more than the noisy training decisions (docs/results.md), so the range is wider than the
    # band; it fails both a loss that does not push and one that does not stop.
    assert _metrics(tmp_path)[0]["achieved_cr_train"] < 1.1
    assert 0.9 * TARGET_CR <= report["achieved_cr"] <= 1.35 * TARGET_CR, report
    assert report["kl_to_teacher"] < 0.5
    for key in ("target_cr", "teacher_recall_acc", "student_recall_acc", "steps", "tokens_per_s"):
        assert key in report
    assert (tmp_path / "refit.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / f"iter_{E2E_STEPS:07d}").is_dir()
    m = _metrics(tmp_path)
    assert [x["step"] for x in m] == list(range(1, E2E_STEPS + 1))
    assert m[0]["target_cr"] == 1.0 and m[-1]["target_cr"] == TARGET_CR
    assert {"evicted_fraction/layer1", "evicted_fraction/layer2", "lr", "grad_norm", "tokens_per_s"} <= set(m[-1])


@pytest.mark.parametrize("source,mode", [("adapter", "adapter")])
def test_adapter_only_refit_changes_only_the_adapter(assets, tmp_path, source, mode):
    import torch

    from dms_megatron.checkpoint import load_checkpoint
    from dms_megatron.config import RefitConfig
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.checkpoint import load_model_weights

    d = refit_dict(assets, steps=3, save_interval=3, mode=mode)
    d["dms"]["alpha_source"] = source
    cfg = RefitConfig.from_dict(d)
    run_refit(cfg, tmp_path)
    before = build_gpt_model(cfg.model, cfg.dms, seq_length=cfg.train.seq_length)
    load_model_weights(assets["teacher"], before, allow_missing=("dms_alpha",))
    after = build_gpt_model(cfg.model, cfg.dms, seq_length=cfg.train.seq_length)
    load_checkpoint(tmp_path / "checkpoints", after)
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters())
               if not torch.equal(a, b)]
    assert changed and all("dms_alpha" in n for n in changed), changed


def test_resume_after_sigkill_is_bit_identical(assets, tmp_path):
    cfg = refit_dict(assets, steps=8, save_interval=3)
    full = _worker(tmp_path / "full", cfg)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _worker(tmp_path / "killed", cfg, fault="kill@5")
    assert killed.returncode == -9
    assert [m["step"] for m in _metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    resumed = _worker(tmp_path / "killed", cfg)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "killed")
    keys = ("loss", "kd_loss", "compression_loss", "evicted_fraction", "lr", "grad_norm")
    assert [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
    # the data position follows from step * global batch: a changed batch size is refused, not silently misread
    cfg["train"]["global_batch_size"] = 2 * cfg["train"]["global_batch_size"]
    changed = _worker(tmp_path / "killed", cfg)
    assert changed.returncode == 2 and "resume with the original batch size" in changed.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
    cfg = refit_dict(assets, steps=8, save_interval=2)
    r = _worker(tmp_path, cfg, fault="nan@5")
    assert r.returncode == 3
    assert "loss is nan at step 4" in r.stderr
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_a_rank_tears_down_the_process_groups_it_created_and_only_those(assets, tmp_path):
    """torch asks for destroy_process_group before a normal exit (a gloo rank that leaves its groups to interpreter
    shutdown can abort there with exit -6): run_rank destroys the groups it created, whether the run finished or
    diverged; groups its caller owns (this test session, dms-eval) stay."""
    import torch.distributed as dist

    from dms_megatron.megatron.distributed import destroy_process_groups, init_process_groups
    from dms_megatron.training.entry import DIVERGED_EXIT_CODE, run_rank

    def job(name):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(refit_dict(assets, steps=2, save_interval=2)))
        return run_dir

    assert run_rank(job("caller-owned")) == 0 and dist.is_initialized()
    destroy_process_groups()
    try:
        assert run_rank(job("finished")) == 0 and not dist.is_initialized()
        assert run_rank(job("diverged"), fault="nan@2") == DIVERGED_EXIT_CODE and not dist.is_initialized()
    finally:
        init_process_groups(1, 1, seed=1234)  # the session's groups, as the other tests expect them


@pytest.mark.parametrize("patch,needle", [
    ({"dms": {"final_cr": 0.5}}, "dms.final_cr=0.5"),
    ({"dms": {"final_step": 0}}, "dms.final_step=0"),
    ({"dms": {"window": 64}}, "dms.window=64 must be < train.seq_length=64"),
    ({"data": {"train_prefix": "/nonexistent/train"}}, "/nonexistent/train.bin does not exist"),
])
def test_bad_input_fails_before_training(assets, tmp_path, patch, needle):
    cfg = refit_dict(assets)
    for section, values in patch.items():
        cfg[section].update(values)
    r = _worker(tmp_path, cfg)
    assert r.returncode == 2, r.stderr[-1000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tokenizer_vocab_mismatch_is_refused(assets, tmp_path):
    from dms_megatron.data.tokenizer import train_tokenizer

    big = train_tokenizer(["abc def " * 50 + "".join(chr(0x400 + i) for i in range(400))] * 20, 600,
                          tmp_path / "bigtok")
    assert len(big) > assets_vocab(assets)
    cfg = refit_dict(assets)
    cfg["data"]["tokenizer"] = str(tmp_path / "bigtok")
    r = _worker(tmp_path / "run", cfg)
    assert r.returncode == 2 and "wrong tokenizer for this model" in r.stderr


def assets_vocab(assets):
    return assets["model"]["vocab_size"]


def test_corrupt_checkpoint_is_refused(assets, tmp_path):
    from dms_megatron.checkpoint import CheckpointError, resolve_checkpoint

    cfg = refit_dict(assets, steps=3, save_interval=3)
    assert _worker(tmp_path, cfg).returncode == 0
    ck = tmp_path / "checkpoints"
    (ck / "iter_0000003" / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="partial or corrupt: metadata.json is missing"):
        resolve_checkpoint(ck)
    r = _worker(tmp_path, cfg)
    assert r.returncode != 0 and "partial or corrupt" in r.stderr
    (ck / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(CheckpointError, match="is corrupt"):
        resolve_checkpoint(ck)

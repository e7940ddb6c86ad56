"""Tensor, pipeline and data parallel re-fits (gloo, torchrun) against one rank, and dist-checkpoint resharding.

Every layout starts from the same random teacher checkpoint and reads the same global batches; per-step losses,
per-layer evicted fractions, the student's reduced gradients of every step (saved as a dist checkpoint and loaded
at tp = pp = 1) and the final weights must match the one-rank run within fp32 tolerance. The default run covers
tp=2, pp=2 and dp=2; tp=2 x pp=2 (4 processes) and the sequence-parallel cases are marked slow: ``pytest -m parallel`` (or ``-m "slow or not slow"``)
runs the full matrix.
"""

import json
from pathlib import Path

import pytest

from parallel_harness import dump_grads
from refit_fixtures import refit_dict, shared_assets
from spawn_util import torchrun_harness

pytestmark = pytest.mark.parallel

STEPS = 3
# Adam's first step moves every weight by about +-lr whatever its gradient's size, so fp32 reduction-order noise in
# near-zero gradients becomes weight noise of order lr; a small lr keeps later steps comparable at fp32 tolerance.
LR = 1e-4


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def _cfg_dict(assets, tp=1, pp=1, steps=STEPS, sp=False, **dms):
    d = refit_dict(assets, steps=steps, save_interval=100, warmup_steps=0, lr=LR, min_lr=LR / 10, eval_interval=2)
    d["dms"].update(initial_cr=2.0, final_cr=4.0, final_step=steps, **dms)  # compression loss active from step 1
    d["parallel"] = dict(tp=tp, pp=pp, sequence_parallel=sp)
    return d


def _run_one_rank(d, run_dir):
    from dms_megatron.config import RefitConfig
    from refit_fixtures import run_refit

    run_refit(RefitConfig.from_dict(d), run_dir, report=False, after_backward=dump_grads(run_dir))
    return run_dir


def _metrics(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _weights(d, ckpt_dir, iteration=None):
    """Student tensors of a checkpoint, loaded (resharded) at tp = pp = 1 in this process."""
    from dms_megatron.config import RefitConfig
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.checkpoint import load_model_weights

    cfg = RefitConfig.from_dict(d)
    m = build_gpt_model(cfg.model, cfg.dms, seq_length=cfg.train.seq_length)
    load_model_weights(ckpt_dir, m, iteration=iteration)
    return {k: v.detach().clone() for k, v in m.state_dict().items() if not k.endswith("_extra_state")}


def _assert_close(ref: dict, got: dict, rel: float, what: str, atol: float = 0.0):
    assert ref.keys() == got.keys()
    for k in ref:
        scale = float(ref[k].abs().max()) + 1e-12
        err = float((ref[k] - got[k]).abs().max())
        assert err <= rel * scale + atol, f"{what}: {k} differs by {err:.3g} (max |ref| {scale:.3g})"


@pytest.fixture(scope="module")
def one_rank(assets, tmp_path_factory):
    d = _cfg_dict(assets)
    return d, _run_one_rank(d, tmp_path_factory.mktemp("one-rank"))


@pytest.mark.parametrize("tp,pp,nproc,sp", [
    pytest.param(2, 1, 2, False, id="tp2"),
    pytest.param(1, 2, 2, False, id="pp2"),
    pytest.param(1, 1, 2, False, id="dp2"),
    pytest.param(2, 2, 4, False, id="tp2pp2", marks=pytest.mark.slow),
    pytest.param(2, 1, 2, True, id="tp2-sp", marks=pytest.mark.slow),
    pytest.param(2, 2, 4, True, id="tp2pp2-sp", marks=pytest.mark.slow),
])
def test_layout_matches_one_rank(assets, one_rank, tmp_path, tp, pp, nproc, sp):
    d1, dir1 = one_rank
    d = _cfg_dict(assets, tp=tp, pp=pp, sp=sp)
    report = ("--report",) if pp > 1 else ()  # the report stage at the training layout
    torchrun_harness(nproc, d, tmp_path, "--run-dir", tmp_path / "run", *report)
    a, b = _metrics(dir1), _metrics(tmp_path / "run")
    assert [x["step"] for x in b] == list(range(1, STEPS + 1))
    assert any(x["compression_loss"] > 0 for x in a)  # the compression term's gradient is exercised
    keys = ["loss", "kd_loss", "compression_loss", "evicted_fraction"] + [k for k in a[0] if "/layer" in k]
    evaluated = ["valid/kd_loss", "valid/evicted_fraction", "valid/achieved_cr"]  # the evaluate stage, at step 2
    assert [[k in x for k in evaluated] for x in a + b] == [[False] * 3, [True] * 3, [False] * 3] * 2
    for x, y in zip(a, b):
        for k in keys + [k for k in evaluated if k in x]:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-7), (x["step"], k)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
    for it in range(1, STEPS + 1):
        _assert_close(_weights(d1, dir1 / "grads", it), _weights(d, tmp_path / "run" / "grads", it), 1e-3,
                      f"gradient of step {it}")
    if report:
        rep = json.loads((tmp_path / "run" / "report.json").read_text())
        assert rep["steps"] == STEPS and 0 <= rep["kl_to_teacher"] < 1 and rep["achieved_cr"] >= 1
    # Adam moves a weight whose gradient is at fp32 noise level by a random fraction of lr per step
    _assert_close(_weights(d1, dir1 / "checkpoints"), _weights(d, tmp_path / "run" / "checkpoints"), 0.0,
                  "final weights", atol=0.1 * STEPS * LR)


@pytest.mark.slow
def test_alpha_per_layer_under_tp2_matches_one_rank(assets, tmp_path):
    """dms.alpha_per=layer: KV head 0 (on tp rank 0) decides for every head of the layer on every rank."""
    d1, d2 = _cfg_dict(assets, alpha_per="layer"), _cfg_dict(assets, tp=2, alpha_per="layer")
    dir1 = _run_one_rank(d1, tmp_path / "one")
    torchrun_harness(2, d2, tmp_path, "--run-dir", tmp_path / "tp2")
    a, b = _metrics(dir1), _metrics(tmp_path / "tp2")
    for x, y in zip(a, b):
        for k in ("loss", "kd_loss", "compression_loss", "evicted_fraction", "evicted_fraction/layer1"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-7), (x["step"], k)
    for it in range(1, STEPS + 1):
        _assert_close(_weights(d1, dir1 / "grads", it), _weights(d2, tmp_path / "tp2" / "grads", it), 1e-3,
                      f"gradient of step {it}")

"""``dms-dryrun``: rank layout, memory estimate and tokens per step of a config without starting anything; bad
layouts fail in one line before any process group (``dms-refit`` too)."""

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cfg(parallel="h100_256", model="qwen3-8b", train="paper", dms="paper"):
    from dms_megatron.training.config import RefitConfig

    d = {"parallel": parallel, "model": model, "train": train, "dms": dms}
    return RefitConfig.from_dict({k: yaml.safe_load((ROOT / "configs" / k / f"{v}.yaml").read_text())
                                  for k, v in d.items()})


def test_h100_layout_groups_tokens_and_parameter_count():
    from dms_megatron.launch.dry_run import describe, layer_params, rank_groups, stage_params

    cfg = _cfg()
    assert cfg.parallel.world_size == 256
    g = rank_groups(8, 2, 16)
    # tp innermost (one node of 8 GPUs), then dp, then pp: rank r = tp + 8 * (dp + 16 * pp)
    assert g["tp"][0] == list(range(8)) and len(g["tp"]) == 32
    assert g["dp"][0] == list(range(0, 128, 8)) and len(g["dp"]) == 8 * 2
    assert g["pp"][0] == [0, 128] and len(g["pp"]) == 128
    mc = cfg.model
    total = mc.num_layers * layer_params(mc, None) + 2 * mc.vocab_size * mc.hidden_size + mc.hidden_size
    assert 8.1e9 < total < 8.3e9  # Qwen3-8B: 8.2B parameters (model card)
    # one GPU of the busiest stage holds about 1/16 of the model (plus a vocabulary shard)
    assert total / 16 < stage_params(mc, None, 8, 2) < total / 16 * 1.1
    text = describe(cfg)
    assert "tp=8 pp=2 dp=16" in text and "1,048,576 tokens per step" in text
    assert "[0, 128]" in text and "teacher copy" in text and "Adam moments" in text


def _run(module, *args):
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_command_prints_layout_and_refit_refuses_bad_layout_in_one_line(tmp_path):
    r = _run("dms_megatron.launch.dry_run", "parallel=tp2pp2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tp=2 pp=2 dp=1" in r.stdout and "tp groups: [0, 1], [2, 3]" in r.stdout and "MiB" in r.stdout
    assert not list(tmp_path.iterdir())
    bad = _run("dms_megatron.launch.refit", "parallel.tp=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert bad.returncode == 2
    err = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert err == ["error: parallel.tp=4 does not divide model.num_attention_heads (query heads)=6: choose "
                   "parallel.tp among its divisors"]
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing started


@pytest.mark.parametrize("override,needle", [
    ("parallel.pp=3", "parallel.pp=3 does not divide model.num_layers=4"),
    ("parallel.nproc_per_node=6", "world size 6 is not a multiple of parallel.tp * parallel.pp = 2 * 2 = 4"),
])
def test_dry_run_bad_layouts(override, needle):
    from dms_megatron.launch.dry_run import main

    args = ["parallel=tp2pp2", override]
    buf = io.StringIO()
    with redirect_stderr(buf):
        rc = main(args)
    assert rc == 2 and needle in buf.getvalue() and buf.getvalue().count("\n") == 1

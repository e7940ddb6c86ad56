"""``dms-dryrun``: rank layout, memory estimate and tokens per step of a config without starting anything; bad
layouts fail in one line before any process group (``dms-refit`` too)."""

import dataclasses
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
    from dms_megatron.config import RefitConfig

    d = {"model": model, "dms": dms, "train": train, "parallel": parallel}  # refit.yaml's defaults order
    merged: dict = {}
    for k, v in d.items():
        text = (ROOT / "dms_megatron" / "configs" / k / f"{v}.yaml").read_text()
        group = yaml.safe_load(text)
        for key, val in (group if "@package _global_" in text else {k: group}).items():
            merged.setdefault(key, {}).update(val)
    return RefitConfig.from_dict(merged)


def test_h100_layout_groups_tokens_and_parameter_count():
    from dms_megatron.launch.dry_run import describe, estimate, layer_params, rank_groups, stage_params

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
    text, fits = describe(cfg)
    assert "tp=8 pp=2 dp=16" in text and "1,048,576 tokens per step" in text
    assert "[0, 128]" in text and "teacher copy" in text and "Adam moments + fp32 main params" in text
    assert "bf16 parameters" in text and fits and "fits a 80 GiB GPU" in text
    # the preset shards Adam state over dp=16: 12 bytes (two fp32 moments + fp32 main param) per trainable parameter
    # of the busiest stage's GPU, divided by 16
    assert cfg.train.distributed_optimizer and "distributed optimizer" in text
    assert estimate(cfg, 16).optimizer == 12 * stage_params(mc, cfg.dms, 8, 2) // 16
    # Megatron-LM's padding: 151,936 -> a multiple of 128 * 8 = 152,576; the last stage's logits / KL buffers of one
    # [4096, 1] micro batch: 3 bf16 + 3 fp32 values per local vocabulary entry (152,576 / 8 = 19,072)
    assert mc.padded_vocab_size(8) == 152_576 and mc.padded_vocab_size(1) == 151_936
    assert estimate(cfg, 16).logits == 4096 * 19_072 * (3 * 2 + 3 * 4)
    assert "evaluation stage" in text and "checkpoint save writes" in text and "logits / KL" in text


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
    ("parallel.nproc_per_node=6", "world size 6 (parallel.nnodes * parallel.nproc_per_node) is not a multiple of "
                                  "parallel.tp * parallel.pp = 4"),
])
def test_dry_run_bad_layouts(override, needle):
    from dms_megatron.launch.dry_run import main

    args = ["parallel=tp2pp2", override]
    buf = io.StringIO()
    with redirect_stderr(buf), pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and needle in buf.getvalue() and buf.getvalue().count("\n") == 1


def test_dry_run_says_when_a_layout_does_not_fit_and_counts_bf16_and_the_distributed_optimizer():
    from dms_megatron.launch.dry_run import describe, estimate

    base = _cfg()
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, distributed_optimizer=False))
    long = dataclasses.replace(base, train=dataclasses.replace(base.train, seq_length=40960, micro_batch_size=8))
    text, fits = describe(long)
    assert not fits and "DOES NOT FIT a 80 GiB GPU" in text and "train.distributed_optimizer=true" in text
    text, _ = describe(dataclasses.replace(long, train=dataclasses.replace(long.train, distributed_optimizer=True)))
    assert "DOES NOT FIT" in text and "distributed_optimizer" not in text.splitlines()[-1]  # no hint already taken
    # bf16 parameters are half of fp32's; the distributed optimizer divides the optimizer state by dp (16)
    fp32 = dataclasses.replace(base, train=dataclasses.replace(base.train, precision="fp32"))
    assert estimate(fp32, 16).student_params == 2 * estimate(base, 16).student_params
    dist = dataclasses.replace(base, train=dataclasses.replace(base.train, distributed_optimizer=True))
    assert estimate(dist, 16).optimizer * 16 == pytest.approx(estimate(base, 16).optimizer, rel=1e-6)
    assert describe(base, gpu_memory_gib=1)[1] is False

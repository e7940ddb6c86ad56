"""The Hydra launcher `dms-refit`: overrides reach the worker, run-dir outputs, multirun, one-line config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refit_fixtures import shared_assets

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_STEPS = 2
SWEEP_CRS = (2, 3)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def _overrides(assets, steps=LAUNCH_STEPS):
    model = [f"model.{k}={v}" for k, v in assets["model"].items() if v is not None]
    return model + [
        "embedded=false", f"train.init_checkpoint={assets['teacher']}", f"data.train_prefix={assets['train']}",
        f"data.valid_prefix={assets['valid']}", f"data.tokenizer={assets['tokenizer']}",
        f"data.recall_eval={assets['recall']}", f"train.steps={steps}", "train.seq_length=64",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_batches=1",
        "train.recall_eval_limit=2", "train.warmup_steps=1", "logging.progress=false", "logging.wandb=false",
    ]


def _launch(args, timeout=600):
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "dms_megatron.launch.refit", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_overrides_reach_the_run_and_outputs_land_in_run_dir(assets, tmp_path):
    run = tmp_path / "run"
    r = _launch(_overrides(assets) + ["dms.final_cr=3", "dms.window=8", "dms.final_step=2",
                                      "train.save_interval=1", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["dms"]["final_cr"] == 3 and cfg["dms"]["window"] == 8 and cfg["train"]["steps"] == LAUNCH_STEPS
    assert "hydra" not in cfg
    report = json.loads((run / "report.json").read_text())
    for key in ("target_cr", "achieved_cr", "kl_to_teacher", "teacher_recall_acc", "student_recall_acc", "steps",
                "tokens_per_s"):
        assert key in report, key
    assert report["target_cr"] == 3 and report["steps"] == LAUNCH_STEPS
    ck = run / "checkpoints"
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == str(LAUNCH_STEPS)
    assert (ck / "iter_0000001").is_dir() and (ck / "iter_0000002").is_dir()
    assert (run / "refit.png").is_file()


def test_multirun_sweeps_locally(assets, tmp_path):
    sweep = tmp_path / "sweep"
    r = _launch(["-m", f"dms.final_cr={','.join(map(str, SWEEP_CRS))}", f"hydra.sweep.dir={sweep}",
                 "train.save_interval=100"] + _overrides(assets, steps=1))
    assert r.returncode == 0, r.stderr[-3000:]
    reports = sorted(sweep.glob("*/report.json"))
    assert len(reports) == len(SWEEP_CRS)
    assert sorted(json.loads(p.read_text())["target_cr"] for p in reports) == list(SWEEP_CRS)


@pytest.mark.parametrize("override,needle", [
    ("dms.final_cr=0.5", "dms.final_cr=0.5"),
    ("dms.window=64", "dms.window=64 must be < train.seq_length=64"),
    ("train.mode=lora", "train.mode"),
])
def test_bad_values_fail_in_one_line_before_training(assets, tmp_path, override, needle):
    run = tmp_path / "run"
    r = _launch(_overrides(assets) + [override, f"hydra.run.dir={run}"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr[-2000:]
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("args,line", [
    (["dms.windw=8"], "error: unknown key 'dms.windw'; did you mean dms.window?"),
    (["train.train_iters=100"], "error: unknown key 'train.train_iters'; did you mean train.steps?"),
    (["train.micro_bach_size=2"], "error: unknown key 'train.micro_bach_size'; did you mean train.micro_batch_size?"),
    (["train.colour=red"], "error: unknown key 'train.colour'\n"),
    (["training.steps=3"], "error: unknown key 'training.steps'; did you mean train.steps?"),
    (["train.steps=abc"], "error: train.steps=abc is invalid: must be integer"),
    (["model=qwen3_8b"], "error: model=qwen3_8b is not a preset; did you mean model=qwen3-8b?"),
    (["-m", "dms.final_cr=2,4", "dms.windw=8"], "error: unknown key 'dms.windw'; did you mean dms.window?"),
])
def test_hydra_errors_are_one_line_with_a_suggestion(tmp_path, args, line):
    r = _launch(args + [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and (lines[0] + "\n").startswith(line), r.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def _blend_overrides(assets, blend):
    return [o for o in _overrides(assets) if not o.startswith(("data.train_prefix", "data.valid_prefix"))] + \
        [f"data.blend={blend}", "data.split=[90,10,0]"]


@pytest.mark.parametrize("blend,needle", [
    ("[0.3,{t},0.7]", "data.blend="),
    ("[0.3,{t},0.7,/nowhere/b]", "data.blend /nowhere/b: /nowhere/b.bin does not exist"),
])
def test_bad_blends_fail_in_one_line_before_anything_starts(assets, tmp_path, blend, needle):
    run = tmp_path / "run"
    r = _launch(_blend_overrides(assets, blend.format(t=assets["train"], v=assets["valid"]))
                + [f"hydra.run.dir={run}"], timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
    assert not run.exists()


@pytest.mark.parametrize("name,key", [("data_path", "data.blend"), ("data.train_data_path", "data.train_blend"),
                                      ("data.valid_data_path", "data.valid_blend"), ("split", "data.split")])
def test_megatron_lm_data_flags_are_suggested(name, key):
    from dms_megatron.config import RefitConfig
    from dms_megatron.launch.hydra_cli import schema_keys, suggest_key

    assert suggest_key(name, schema_keys(RefitConfig)) == key


def test_megatron_lm_data_path_on_the_command_line_names_data_blend(tmp_path):
    r = _launch(["data_path=[0.3,A,0.7,B]", f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown key 'data_path'; did you mean data.blend?", \
        r.stderr[-2000:]


# Published architecture numbers (the models' HF config.json): layers, hidden, ffn, heads, kv heads, head dim, vocab.
PRESETS = {
    "llama3.2-1b": (16, 2048, 8192, 32, 8, 64, 128256),
    "qwen-r1-1.5b": (28, 1536, 8960, 12, 2, 128, 151936),
    "qwen-r1-7b": (28, 3584, 18944, 28, 4, 128, 152064),
    "qwen-r1-32b": (64, 5120, 27648, 40, 8, 128, 152064),
    "qwen3-8b": (36, 4096, 12288, 32, 8, 128, 151936),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_presets_are_valid_and_match_published_sizes(name):
    from dms_megatron.config import ModelConfig, from_dict

    mc = from_dict(ModelConfig, yaml.safe_load((ROOT / "dms_megatron" / "configs" / "model" / f"{name}.yaml").read_text()))
    got = (mc.num_layers, mc.hidden_size, mc.ffn_hidden_size, mc.num_attention_heads, mc.num_query_groups,
           mc.kv_channels, mc.vocab_size)
    assert got == PRESETS[name]
    assert mc.padded_vocab_size() % 128 == 0 and mc.padded_vocab_size(8) % (128 * 8) == 0


@pytest.mark.parallel
def test_data_parallel_two_ranks_match_one_rank(assets, tmp_path):
    """parallel=dp2 runs two local gloo ranks; same global batch -> same losses as one rank."""
    common = _overrides(assets) + ["train.save_interval=100", "train.global_batch_size=4",
                                   "train.micro_batch_size=2"]
    one = _launch(common + [f"hydra.run.dir={tmp_path / 'dp1'}"])
    two = _launch(common + ["parallel=dp2", f"hydra.run.dir={tmp_path / 'dp2'}"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = ([json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("dp1", "dp2"))
    assert len(a) == len(b) == LAUNCH_STEPS
    for x, y in zip(a, b):
        for k in ("loss", "kd_loss", "compression_loss", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4), k

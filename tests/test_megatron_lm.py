"""Megatron-LM checkpoints (see ``mlm_fixtures``: written the way Megatron-LM writes one) as a re-fit's starting
point: detected by their common state, the architecture read from ``args`` and checked against the run's model
config, and the weights loaded into the teacher and the DMS student at another layout than they were saved at, with
today's or older megatron-core's layer names."""

from __future__ import annotations

import functools
from dataclasses import asdict

import pytest
import torch

import mlm_fixtures
from conftest import tiny_model_config
from spawn_util import spawn_and_collect

# vocabulary 128 pads to 128 rows both at tp 1 (a multiple of 32) and as Megatron-LM pads it at tp 2 (of 64)
MC = asdict(tiny_model_config(vocab_size=128, max_position_embeddings=64))


def _check_loads(save, reference):
    from dms_megatron.checkpoint.megatron_lm import megatron_lm_args, model_config_from_args
    from dms_megatron.config import DMSConfig, ModelConfig
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.training.inputs import init_model_config
    from dms_megatron.training.weights import load_init_weights

    like = ModelConfig(**MC)
    assert megatron_lm_args(save) is not None
    mc = init_model_config(save, like)
    assert mc == like  # every field read back from Megatron-LM's args
    assert model_config_from_args(megatron_lm_args(save)).family == "llama"
    teacher = build_gpt_model(mc, None, seq_length=64)
    load_init_weights(save, teacher, mc)
    got = dict(teacher.named_parameters())
    assert got.keys() == reference.keys()
    for name, w in reference.items():
        assert torch.equal(got[name].detach(), w), name
    student = build_gpt_model(mc, DMSConfig(alpha_source="adapter"), seq_length=64)
    load_init_weights(save, student, mc, allow_missing=("dms_alpha",))
    for name, p in student.named_parameters():
        if "dms_alpha" not in name:
            assert torch.equal(p.detach(), reference[name]), name


def test_megatron_lm_checkpoint_with_legacy_local_norm_names_loads_into_teacher_and_student(tmp_path, megatron_single):
    from dms_megatron.megatron.distributed import init_process_groups

    try:
        mlm_fixtures.write(str(tmp_path / "mlm"), MC, 1, 1, True, str(tmp_path / "dump"))
    finally:
        init_process_groups(1, 1, seed=1234)  # the session's groups as other tests expect them
    _check_loads(tmp_path / "mlm", mlm_fixtures.merged(str(tmp_path / "dump"), 1))


def test_a_megatron_lm_checkpoint_gives_the_architecture_a_family_only_model_section_leaves_unset(tmp_path,
                                                                                                megatron_single):
    """The shape fields come from Megatron-LM's args; the vocabulary size, which its args lack (a Hugging Face
    tokenizer), must be given, in one line."""
    from dms_megatron.config import REQUIRED, ConfigError
    from dms_megatron.megatron.distributed import init_process_groups
    from dms_megatron.training.inputs import complete_model

    try:
        mlm_fixtures.write(str(tmp_path / "mlm"), MC, 1, 1, False, str(tmp_path / "dump"))
    finally:
        init_process_groups(1, 1, seed=1234)
    d = {"model": {"family": "llama"}, "train": {"init_checkpoint": str(tmp_path / "mlm")}}
    with pytest.raises(ConfigError) as e:
        complete_model(d)
    assert str(e.value) == (f"model.vocab_size is unset and the Megatron-LM checkpoint {tmp_path / 'mlm'} does not "
                            f"record it (its args hold only the padded size 128): give model.vocab_size=N, the "
                            f"tokenizer's vocabulary")
    d["model"]["vocab_size"] = MC["vocab_size"]
    got = complete_model(d)["model"]
    assert {f: got[f] for f in REQUIRED} == {f: MC[f] for f in REQUIRED}


@pytest.mark.parallel
def test_megatron_lm_checkpoint_saved_at_tp2_loads_at_one_rank(tmp_path, megatron_single):
    target = functools.partial(mlm_fixtures.spawned_rank, save=str(tmp_path / "mlm"), mc=MC, tp=2, pp=1,
                               legacy_names=False, dump=str(tmp_path / "dump"))
    spawn_and_collect(target, 2, timeout=300)
    _check_loads(tmp_path / "mlm", mlm_fixtures.merged(str(tmp_path / "dump"), 2))


def test_megatron_lm_args_that_differ_from_the_config_are_named_in_one_line(tmp_path):
    from dms_megatron.checkpoint.megatron_lm import model_config_from_args
    from dms_megatron.config import ConfigError, ModelConfig

    args = mlm_fixtures.megatron_lm_args(MC, 2, 1, False)
    like = ModelConfig(**dict(MC, num_layers=3, hidden_size=96, kv_channels=None, tie_embeddings=True))
    with pytest.raises(ConfigError) as e:
        model_config_from_args(args, like)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in ("num_layers: config 3 vs checkpoint 2", "hidden_size: config 96 vs checkpoint 64",
                   "kv_channels: config 24 vs checkpoint 16", "tie_embeddings: config True vs checkpoint False"):
        assert needle in msg, msg
    args.normalization, args.swiglu = "LayerNorm", False
    with pytest.raises(ConfigError, match="normalization: checkpoint LayerNorm .*swiglu: checkpoint False"):
        model_config_from_args(args, ModelConfig(**MC))


def test_megatron_lm_padding_at_another_tp_is_accepted_and_a_padding_off_the_rule_is_one_line():
    """Megatron-LM pads to a multiple of make_vocab_size_divisible_by x tp, as this project does: a checkpoint saved
    at tp 4 (256 rows for 100 tokens at 64 x 4) loads into a run at any tp (the rows both hold load, padding stays
    zero); a padded size that does not follow the rule is refused naming both sizes."""
    from dms_megatron.checkpoint.megatron_lm import model_config_from_args
    from dms_megatron.config import ConfigError, ModelConfig

    mc = dict(MC, vocab_size=100, make_vocab_size_divisible_by=64)
    args = mlm_fixtures.megatron_lm_args(mc, 4, 1, False)
    assert args.padded_vocab_size == 256
    got = model_config_from_args(args, ModelConfig(**mc))
    assert got.padded_vocab_size(4) == 256 and got.padded_vocab_size(1) == 128
    args.padded_vocab_size = 300
    with pytest.raises(ConfigError) as e:
        model_config_from_args(args, ModelConfig(**mc))
    assert "checkpoint 300 rows" in str(e.value) and "x tp 4 is 256" in str(e.value), str(e.value)


def _cmd(*args, timeout=600):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("RANK", None)
    return subprocess.run([sys.executable, *map(str, args)], env=env, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)


def test_readme_walkthrough_for_a_megatron_lm_user(tmp_path, tmp_path_factory, megatron_single):
    """Every command of the README's "Your own model and data" walk-through, on the tiny test model: preprocess the
    corpora (2 workers), dms-dryrun, the batch host's pre-flight (what slurm/refit.sbatch runs first), the re-fit
    from the Megatron-LM checkpoint on the weighted blend, export of the re-fit and of the Megatron-LM checkpoint."""
    import json

    from refit_fixtures import shared_assets
    from safetensors.torch import load_file

    from dms_megatron.megatron.distributed import init_process_groups

    assets = shared_assets(tmp_path_factory)
    try:
        w = mlm_fixtures.walkthrough_inputs(tmp_path, assets)
    finally:
        init_process_groups(1, 1, seed=1234)
    for name in ("a", "b"):
        r = _cmd("tools/preprocess_data.py", "--input", w[name], "--tokenizer", assets["tokenizer"],
                 "--output-prefix", f"{w['data']}/{name}", "--workers", 2, "--append-eod")
        assert r.returncode == 0, r.stderr[-2000:]
    over = mlm_fixtures.walkthrough_overrides(assets, w)
    r = _cmd("-m", "dms_megatron.launch.dry_run", *over)
    assert r.returncode == 0 and "tp=1 pp=1 dp=1" in r.stdout, r.stderr[-2000:]
    run = tmp_path / "run"
    r = _cmd("-m", "dms_megatron.launch.refit", "--prepare-only", *over, f"hydra.run.dir={run}")
    assert r.returncode == 0 and (run / "config.yaml").is_file(), r.stderr[-2000:]
    r = _cmd("-m", "dms_megatron.launch.refit", *over, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "report.json").read_text())["steps"] == 2
    for src, out in ((run / "checkpoints", tmp_path / "hf-dms"), (w["ckpt"], tmp_path / "hf-from-mlm")):
        r = _cmd("-m", "dms_megatron.launch.convert", "export", "--megatron-path", src, "--hf-path", out,
                 "--format", "plain")
        assert r.returncode == 0, r.stderr[-2000:]
    exported = load_file(str(tmp_path / "hf-from-mlm" / "model.safetensors"))
    written = mlm_fixtures.merged(str(tmp_path / "mlm-dump"), 1)
    assert torch.equal(exported["model.layers.1.mlp.down_proj.weight"],
                       written["decoder.layers.1.mlp.linear_fc2.weight"])

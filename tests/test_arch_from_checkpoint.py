"""A re-fit from a checkpoint reads the architecture from it: a model section that names only the family (or
nothing: ``model=checkpoint``) gets the checkpoint's sizes, a field it sets must agree with the checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from convert_fixtures import make_hf_model, save_hf_model

#: the shape fields, with the config.json key that holds each (the independent reference)
HF_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
           "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
           "kv_channels": "head_dim", "vocab_size": "vocab_size",
           "max_position_embeddings": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings"}


def _hf(hf: dict, key: str):
    """config.json's value of ``key`` (transformers' head_dim when the file leaves it out: hidden / heads)."""
    return hf.get(key) or hf["hidden_size"] // hf["num_attention_heads"] if key == "head_dim" else hf[key]


def _refit(model: dict, init, **data) -> dict:
    return {"model": model, "dms": {"window": 4}, "train": {"init_checkpoint": str(init), "seq_length": 16},
            "data": data or {"train_prefix": "x/train", "valid_prefix": "x/valid", "tokenizer": "x/tok"},
            "embedded": False}


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True)])
def test_a_hf_dir_gives_the_architecture_a_family_only_model_section_leaves_unset(tmp_path, family, tied):
    from dms_megatron.training.inputs import refit_config

    save_hf_model(make_hf_model(family, tied=tied), tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    mc = refit_config(_refit({"family": family, "spec": "local"}, tmp_path / "hf")).model
    for field, key in HF_KEYS.items():
        assert getattr(mc, field) == _hf(hf, key), field
    assert mc.family == family and mc.add_qkv_bias is (family == "qwen2")  # qwen2's block: the q/k/v bias
    assert mc.rotary_base == 10000.0  # a setting with a default keeps it (the teacher is built with its own)


def test_the_checkpoint_preset_composes_to_the_hf_dirs_architecture(tmp_path):
    """``dms-dryrun model=checkpoint``: Hydra's MISSING fields filled from the checkpoint at pre-flight."""
    from dms_megatron.config import RefitConfig
    from dms_megatron.launch.hydra_cli import preflight, register_schema
    from dms_megatron.training.inputs import refit_config

    save_hf_model(make_hf_model("qwen3"), tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    register_schema("refit_schema", RefitConfig)
    cfg = preflight("refit", ["model=checkpoint", "embedded=false", f"train.init_checkpoint={tmp_path / 'hf'}",
                              "train.seq_length=16", "dms.window=4", "data.train_prefix=x/t",
                              "data.valid_prefix=x/v", "data.tokenizer=x/tok"], RefitConfig, refit_config)
    assert cfg.model.family == "qwen3" and cfg.model.qk_layernorm is True
    assert {f: getattr(cfg.model, f) for f in HF_KEYS} == {f: _hf(hf, k) for f, k in HF_KEYS.items()}


def test_a_megatron_checkpoint_gives_its_recorded_architecture_and_a_contradiction_is_one_line(tmp_path_factory,
                                                                                             megatron_single):
    from refit_fixtures import refit_dict, shared_assets

    from dms_megatron.config import REQUIRED, ConfigError
    from dms_megatron.training.inputs import RunInputs, refit_config

    assets = shared_assets(tmp_path_factory)
    d = refit_dict(assets)
    d["model"] = {"family": "llama"}
    cfg = refit_config(d)
    assert {f: getattr(cfg.model, f) for f in REQUIRED} == {f: assets["model"][f] for f in REQUIRED}
    teacher = RunInputs.resolve(cfg, build=False).model_config  # the teacher's own checks pass
    assert {f: getattr(teacher, f) for f in REQUIRED} == {f: getattr(cfg.model, f) for f in REQUIRED}
    d["model"] = {"family": "llama", "num_layers": 3}  # set explicitly: kept, and compared with the checkpoint
    cfg = refit_config(d)
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == assets["model"]["hidden_size"]
    with pytest.raises(ConfigError) as e:
        RunInputs.resolve(cfg, build=False)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"model config does not match the teacher {assets['teacher']}: num_layers: "
                                   f"config 3 vs the teacher {assets['teacher']} {assets['model']['num_layers']}")


def test_a_contradicting_field_of_a_hf_teacher_is_one_line(tmp_path):
    from dms_megatron.config import ConfigError
    from dms_megatron.training.inputs import init_model_config, refit_config

    save_hf_model(make_hf_model("llama"), tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg = refit_config(_refit({"family": "llama", "hidden_size": 2 * hf["hidden_size"]}, tmp_path / "hf"))
    with pytest.raises(ConfigError) as e:
        init_model_config(tmp_path / "hf", cfg.model)
    assert str(e.value) == (f"model config does not match the teacher {tmp_path / 'hf'}: hidden_size: config "
                            f"{2 * hf['hidden_size']} vs the teacher {tmp_path / 'hf'} {hf['hidden_size']}")


def test_without_a_checkpoint_an_unset_field_stays_an_error_and_a_missing_checkpoint_is_named(tmp_path):
    from dms_megatron.config import TINY_TEACHER, ConfigError, MissingValue
    from dms_megatron.training.inputs import refit_config

    model = {k: v for k, v in asdict(TINY_TEACHER).items() if k != "num_layers"}
    with pytest.raises(MissingValue, match=r"^model.num_layers is missing"):
        refit_config({"model": model})
    with pytest.raises(ConfigError, match=f"^train.init_checkpoint {tmp_path / 'nope'} does not exist$"):
        refit_config(_refit({"family": "llama"}, tmp_path / "nope"))

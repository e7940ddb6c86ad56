"""Bad configuration values fail at construction with a one-line message naming the field and allowed values."""

import pytest

from dataclasses import asdict

from dms_megatron.config import TINY_TEACHER, ConfigError, DMSConfig, ModelConfig, RefitConfig, from_dict
from dms_megatron.families import FAMILIES


def model(**kw) -> ModelConfig:
    """The tiny teacher's architecture with ``kw`` changed (kv_channels and the block fields re-derived unless given)."""
    return ModelConfig(**{**asdict(TINY_TEACHER), "kv_channels": None, "add_qkv_bias": None, "qk_layernorm": None, **kw})


@pytest.mark.parametrize("kwargs,needle", [
    ({"window": 0}, "dms.window=0"),
    ({"tau": 0.0}, "dms.tau=0.0"),
    ({"tau": -1}, "dms.tau"),
    ({"backend": "cuda-graph"}, "allowed values: auto, dense, flex"),
    ({"alpha_source": "mlp"}, "allowed values: qneuron, adapter"),
    ({"alpha_per": "token"}, "allowed values: head, layer"),
    ({"final_cr": 0.5}, "dms.final_cr"),
    ({"initial_cr": 0.9}, "dms.initial_cr"),
    ({"final_step": 0}, "dms.final_step"),
    ({"cr_loss": "two_sided"}, "allowed values: one_sided, band"),
    ({"cr_band": -0.1}, "dms.cr_band=-0.1"),
    ({"cr_band": 2.0}, "dms.cr_band=2.0"),
    ({"cr_band": "wide"}, "dms.cr_band='wide'"),
])
def test_dms_config_errors(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        DMSConfig(**kwargs)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match=r"num_query_groups=3 .* must divide model.num_attention_heads=8"):
        model(num_attention_heads=8, num_query_groups=3)


def test_model_config_other_errors():
    with pytest.raises(ConfigError, match="model.family"):
        model(family="gpt2")
    assert [model(family=name).family for name in FAMILIES] == list(FAMILIES)  # every registered family
    with pytest.raises(ConfigError, match="kv_channels"):
        model(hidden_size=100, num_attention_heads=3, num_query_groups=1)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="windw"):
        from_dict(DMSConfig, {"windw": 3})
    assert from_dict(DMSConfig, {"window": 3}).window == 3


def test_sequence_parallel_needs_tensor_parallel():
    from dms_megatron.config import ParallelConfig

    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true needs parallel.tp > 1"):
        ParallelConfig(tp=1, sequence_parallel=True)
    assert ParallelConfig(tp=2, sequence_parallel=True).world_size == 2


def test_batch_must_split_over_data_parallel_ranks_and_positions_must_fit():
    from dms_megatron.config import ParallelConfig, RefitConfig, TrainConfig

    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch_size \* data-parallel size = 8 \* 2"):
        RefitConfig(TINY_TEACHER, parallel=ParallelConfig(nproc_per_node=2))
    assert RefitConfig(TINY_TEACHER, parallel=ParallelConfig(nproc_per_node=2),
                       train=TrainConfig(micro_batch_size=4)).parallel.dp == 2
    with pytest.raises(ConfigError, match="train.seq_length=512 exceeds model.max_position_embeddings=256"):
        RefitConfig(TINY_TEACHER, train=TrainConfig(seq_length=512))


def test_nested_from_dict_names_the_section_of_an_unknown_key():
    from dms_megatron.config import RefitConfig

    with pytest.raises(ConfigError, match=r"\['train.train_iters'\]"):
        RefitConfig.from_dict({"train": {"train_iters": 3}})


def test_hydra_defaults_are_the_dataclass_defaults():
    """Each default lives once, in the dataclasses: the default YAML groups override nothing, so composing
    ``refit`` / ``eval`` without overrides gives exactly the dataclasses' defaults (only eval's students log to
    metrics.jsonl alone, an override the eval config states)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dms_megatron.config import RefitConfig
    from dms_megatron.eval.config import EvalConfig
    from dms_megatron.launch.hydra_cli import CONFIG_DIR, register_schema

    register_schema("refit_schema", RefitConfig)
    register_schema("eval_schema", EvalConfig)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        refit = OmegaConf.to_container(compose(config_name="refit"), resolve=True)
        ev = OmegaConf.to_container(compose(config_name="eval"), resolve=True)
    assert RefitConfig.from_dict(refit) == RefitConfig(TINY_TEACHER)
    expected = EvalConfig(RefitConfig(TINY_TEACHER))
    expected.refit.logging.wandb = False
    assert EvalConfig.from_dict(ev) == expected


@pytest.mark.parametrize("override,line", [
    ("train.lr=abc", "error: train.lr=abc is invalid: must be float"),
    ("logging.wandb=maybe", "error: logging.wandb=maybe is invalid: must be boolean"),  # OmegaConf's own words differ
    ("dms.window=[1,2]", "error: dms.window=[1, 2] is invalid: must be integer"),
    ("~dms.windw", "error: unknown key 'dms.windw'; did you mean dms.window?"),
    ("dms.final_crr=8", "error: unknown key 'dms.final_crr'; did you mean dms.final_cr?"),
    ("parallel=tp3", "error: parallel=tp3 is not a preset; did you mean parallel=tp2?"),
])
def test_hydra_errors_come_from_exception_types_and_the_schema(capsys, override, line):
    """In-process pre-flight: the line is built from the exception's fields (key, value, missing preset) and the
    schema's field types, not from Hydra's prose."""
    from dms_megatron.launch.hydra_cli import preflight, register_schema

    register_schema("refit_schema", RefitConfig)
    with pytest.raises(SystemExit) as e:
        preflight("refit", [override], RefitConfig, RefitConfig.from_dict)
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(line + ("" if "preset" in line else "\n"))


def test_override_keys_are_checked_against_the_schema_before_composing():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dms_megatron.eval.config import EvalConfig
    from dms_megatron.launch.hydra_cli import schema_fields, unknown_override_key

    def first_unknown(schema, *ovs):
        parsed = OverridesParser.create().parse_overrides(list(ovs))
        return unknown_override_key(parsed, schema_fields(schema), ["dms", "model", "parallel", "train"])

    assert first_unknown(RefitConfig, "dms=paper", "parallel.tp=2", "+extra=1", "embedded=false") is None
    assert first_unknown(RefitConfig, "dms.window=8", "training.steps=3") == "training.steps"
    assert first_unknown(EvalConfig, "students.4=/runs/a", "refit.dms.window=8", "press.quest_page=8") is None
    assert first_unknown(EvalConfig, "refit.dms.windw=8") == "refit.dms.windw"


def test_a_model_field_left_unset_is_one_line_not_a_toy_default():
    """ModelConfig's shape fields have no default: a dict (or preset) that omits one fails naming it, instead of
    inheriting the tiny teacher's value."""
    from dms_megatron.config import MissingValue

    partial = {k: v for k, v in asdict(TINY_TEACHER).items() if k not in ("hidden_size", "vocab_size")}
    with pytest.raises(MissingValue) as e:
        from_dict(ModelConfig, partial, "model")
    assert e.value.keys == ["model.hidden_size", "model.vocab_size"] and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^model is missing"):
        RefitConfig.from_dict({"train": {"steps": 3}})


def test_a_preset_that_omits_a_field_is_one_error_line_naming_field_and_preset(tmp_path, monkeypatch, capsys):
    """A model preset without hidden_size, composed the way dms-refit / dms-dryrun compose: exit 2 and one line
    naming the field and the preset (OmegaConf's MISSING, mapped by exception type)."""
    import shutil

    import yaml

    from dms_megatron.launch import hydra_cli

    shutil.copytree(hydra_cli.CONFIG_DIR, tmp_path / "configs")
    qwen = yaml.safe_load((tmp_path / "configs" / "model" / "qwen3-8b.yaml").read_text())
    del qwen["hidden_size"]
    (tmp_path / "configs" / "model" / "partial.yaml").write_text("# @package model\n" + yaml.safe_dump(qwen))
    monkeypatch.setattr(hydra_cli, "CONFIG_DIR", tmp_path / "configs")
    hydra_cli.register_schema("refit_schema", RefitConfig)
    with pytest.raises(SystemExit) as e:
        hydra_cli.preflight("refit", ["model=partial"], RefitConfig, RefitConfig.from_dict)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: model.hidden_size is missing (no default): give it in the preset "
                                       "model=partial (configs/model/partial.yaml) or as model.hidden_size=VALUE\n")


def test_the_cli_refuses_an_unset_model_field_with_exit_2():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dms_megatron.launch.dry_run", "model.num_layers=???"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr == ("error: model.num_layers is missing (no default): give it in the preset model=tiny "
                          "(configs/model/tiny.yaml) or as model.num_layers=VALUE\n")


def test_the_tiny_teacher_sizes_are_its_shipped_config():
    """TINY_TEACHER (the preset configs/model/tiny.yaml) is the embedded teacher's own architecture."""
    import json

    from dms_megatron.config.model import TINY_PRESET
    from dms_megatron.data.embedded import TEACHER_DIR

    hf = json.loads((TEACHER_DIR / "config.json").read_text())
    assert TINY_PRESET.parent.parent.name == "configs"
    assert ModelConfig.from_hf(hf, TINY_TEACHER.make_vocab_size_divisible_by) == TINY_TEACHER


@pytest.mark.parametrize("family,name", [("qwen2", "add_qkv_bias"), ("qwen3", "qk_layernorm")])
def test_the_family_block_implies_the_attention_extras_and_a_contradiction_is_refused(family, name):
    """family=qwen2 has the q/k/v bias and qwen3 the q/k norms without saying so (families/qwen2.py, qwen3.py declare
    them: Block(qkv_bias=True) / Block(qk_norm=True)); a value that contradicts the family is one line."""
    assert getattr(model(family=family), name) is True
    assert getattr(model(family="llama"), name) is False
    assert getattr(model(family=family, **{name: True}), name) is True
    with pytest.raises(ConfigError) as e:
        model(family=family, **{name: False})
    assert str(e.value) == (f"model.{name}=false contradicts model.family={family}, whose block has {name}=true "
                            f"(leave it unset)")
    with pytest.raises(ConfigError, match=f"model.{name}=true contradicts model.family=llama"):
        model(family="llama", **{name: True})

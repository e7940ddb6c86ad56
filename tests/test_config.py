"""Bad configuration values fail at construction with a one-line message naming the field and allowed values."""

import pytest

from dms_megatron.config import ConfigError, DMSConfig, ModelConfig, from_dict


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
        ModelConfig(num_attention_heads=8, num_query_groups=3)


def test_model_config_other_errors():
    with pytest.raises(ConfigError, match="model.family"):
        ModelConfig(family="gpt2")
    with pytest.raises(ConfigError, match="kv_channels"):
        ModelConfig(hidden_size=100, num_attention_heads=3, num_query_groups=1)


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
        RefitConfig(parallel=ParallelConfig(nproc_per_node=2))
    assert RefitConfig(parallel=ParallelConfig(nproc_per_node=2), train=TrainConfig(micro_batch_size=4)).parallel.dp == 2
    with pytest.raises(ConfigError, match="train.seq_length=512 exceeds model.max_position_embeddings=256"):
        RefitConfig(train=TrainConfig(seq_length=512))


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
    assert RefitConfig.from_dict(refit) == RefitConfig()
    expected = EvalConfig()
    expected.refit.logging.wandb = False
    assert EvalConfig.from_dict(ev) == expected

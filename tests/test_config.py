"""Bad configuration values fail at construction with a one-line message naming the field and allowed values."""

import pytest

from dms_megatron.config import ConfigError, DMSConfig, ModelConfig, from_dict


@pytest.mark.parametrize("kwargs,needle", [
    ({"window": 0}, "dms.window=0"),
    ({"tau": 0.0}, "dms.tau=0.0"),
    ({"tau": -1}, "dms.tau"),
    ({"backend": "triton"}, "allowed values: dense, flex"),
    ({"alpha_source": "mlp"}, "allowed values: qneuron, adapter"),
    ({"alpha_per": "token"}, "allowed values: head, layer"),
    ({"final_cr": 0.5}, "dms.final_cr"),
    ({"initial_cr": 0.9}, "dms.initial_cr"),
    ({"final_step": 0}, "dms.final_step"),
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


def test_defaults_are_valid():
    assert DMSConfig().window == 16
    m = ModelConfig()
    assert m.kv_channels == 32 and m.padded_vocab_size % 128 == 0

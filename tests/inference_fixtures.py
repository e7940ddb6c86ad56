"""Tiny DMS students for the inference tests: random transformers models plus DMS settings (q-neuron or adapter)."""

from __future__ import annotations

import torch

from convert_fixtures import HF_DIVISIBLE_BY, HF_VOCAB, make_hf_model
from dms_megatron.config import DMSConfig, ModelConfig

WINDOW = 3               # small window so eviction happens within a dozen tokens
ADAPTER_STD = 0.05       # adapter projection init: logits * 100 spread over both signs


def model_config(hf_model, family):
    mc = ModelConfig.from_hf(hf_model.config.to_dict(), HF_DIVISIBLE_BY)
    assert mc.family == family
    return mc


def dms_student(family: str, alpha_source: str = "qneuron", alpha_per: str = "head", seed: int = 0,
                window: int = WINDOW):
    """(HF state dict with DMS tensors, ModelConfig, DMSConfig) of a random model whose decisions mix keep/evict."""
    hf = make_hf_model(family, seed=seed)
    mc = model_config(hf, family)
    sd = dict(hf.state_dict())
    dms = DMSConfig(window=window, alpha_source=alpha_source, alpha_per=alpha_per)
    if alpha_source == "adapter":
        g = torch.Generator().manual_seed(seed + 1)
        for i in range(mc.num_layers):
            p = f"model.layers.{i}.self_attn."
            sd[p + "dms_proj_alpha_norm.weight"] = 1 + 0.3 * torch.randn(mc.hidden_size, generator=g)
            sd[p + "dms_proj_alpha.weight"] = ADAPTER_STD * torch.randn(mc.num_query_groups, mc.hidden_size,
                                                                        generator=g)
    return sd, mc, dms


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, HF_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))

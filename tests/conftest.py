"""Shared fixtures: one single-process gloo megatron set-up per test session, tiny named model sizes."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

# Tiny model used across Megatron tests.
TINY_LAYERS = 2
TINY_HIDDEN = 64
TINY_FFN = 128
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_VOCAB = 96
TINY_SEQ = 24


def tiny_model_config(**overrides):
    from dms_megatron.config import ModelConfig

    kw = dict(family="llama", kv_channels=None, tie_embeddings=False, num_layers=TINY_LAYERS, hidden_size=TINY_HIDDEN, ffn_hidden_size=TINY_FFN,
              num_attention_heads=TINY_HEADS, num_query_groups=TINY_KV_HEADS, vocab_size=TINY_VOCAB,
              make_vocab_size_divisible_by=32, max_position_embeddings=256)
    kw.update(overrides)
    return ModelConfig(**kw)


@pytest.fixture(scope="session")
def megatron_single():
    """torch.distributed (gloo, world size 1) + megatron model-parallel groups tp=pp=1."""
    from dms_megatron.megatron.distributed import destroy_process_groups, init_process_groups

    init_process_groups(1, 1, seed=1234)
    yield
    destroy_process_groups()

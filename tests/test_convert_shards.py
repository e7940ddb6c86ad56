"""Tensor / pipeline parallel shards of converted weights (pure tensor work, no processes)."""

import pytest
import torch

from dms_megatron.config import ModelConfig
from dms_megatron.convert import family_by_name
from dms_megatron.convert.mapping import (TP_COLS, TP_GATED, TP_REPLICATED, TP_ROWS, bind_rules,
                                          merge_rank_state_dicts, rank_state_dict, tp_merge, tp_shard)

TP = 2
PP = 2
LAYERS = 4


def test_gated_fc1_shard_holds_its_gate_and_up_rows():
    """megatron's SwiGLU fc1 on tp rank r is [gate_r; up_r], not a contiguous slice of [gate; up]."""
    fc1 = torch.arange(8.0)[:, None]  # gate rows 0..3, up rows 4..7
    assert tp_shard(fc1, TP_GATED, TP, 0).flatten().tolist() == [0, 1, 4, 5]
    assert tp_shard(fc1, TP_GATED, TP, 1).flatten().tolist() == [2, 3, 6, 7]
    assert tp_shard(fc1, TP_ROWS, TP, 1).flatten().tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("kind", [TP_ROWS, TP_COLS, TP_GATED, TP_REPLICATED])
def test_tp_merge_inverts_tp_shard(kind):
    t = torch.randn(8, 6)
    assert torch.equal(tp_merge([tp_shard(t, kind, TP, r) for r in range(TP)], kind), t)


@pytest.mark.parametrize("tied", [False, True])
def test_rank_state_dicts_split_layers_and_merge_back(tied):
    cfg = ModelConfig(family="qwen3", num_layers=LAYERS, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                      num_query_groups=2, vocab_size=50, make_vocab_size_divisible_by=16, qk_layernorm=True,
                      tie_embeddings=tied)
    bound = bind_rules(family_by_name("qwen3").rules, cfg)
    g = torch.Generator().manual_seed(0)
    full = {}
    for b in bound:  # megatron shapes via the HF shapes and the rule's own transform
        hf = [torch.randn(s, generator=g) for s in b.hf_shapes]
        full[b.megatron] = b.rule.transform.to_megatron(hf, cfg)
    per_rank = {(t, p): rank_state_dict(full, bound, cfg, tp=TP, pp=PP, tp_rank=t, pp_rank=p)
                for t in range(TP) for p in range(PP)}
    # stage 1 holds global layers 2, 3 as local 0, 1; embedding only on stage 0, head only on stage 1
    last = per_rank[(1, 1)]
    assert torch.equal(last["decoder.layers.0.self_attention.linear_proj.weight"],
                       full["decoder.layers.2.self_attention.linear_proj.weight"][:, 16:])
    assert "embedding.word_embeddings.weight" not in last and "decoder.final_layernorm.weight" not in per_rank[(0, 0)]
    assert "output_layer.weight" in last  # untied: its own head; tied: a copy of the embedding
    if tied:
        assert torch.equal(last["output_layer.weight"], per_rank[(1, 0)]["embedding.word_embeddings.weight"])
    assert per_rank[(0, 0)]["embedding.word_embeddings.weight"].shape == (cfg.padded_vocab_size // TP, 32)
    merged = merge_rank_state_dicts(per_rank, bound, cfg, tp=TP, pp=PP)
    assert sorted(merged) == sorted(full) and all(torch.equal(merged[k], full[k]) for k in full)

"""HF -> megatron conversion: megatron forward logits equal transformers logits (fp32, vocab padding on)."""

import dataclasses

import pytest
import torch

# transformers' modeling modules are imported before megatron's CPU compat layer is applied
import transformers.models.llama.modeling_llama  # noqa: F401
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
import transformers.models.qwen3.modeling_qwen3  # noqa: F401
from convert_fixtures import (FAMILIES, HF_DIVISIBLE_BY, HF_VOCAB, make_hf_model, save_hf_model, tokens)

from dms_megatron.config import DMSConfig
from dms_megatron.families.rules import FusedQKV, GatedMLP

ATOL = 2e-5             # fp32, different kernels (eager HF vs megatron local spec)
LONG_SEQ = 1024         # relative distances at which llama3 RoPE scaling changes the low frequencies visibly


def _convert(tmp_path, hf_model, dms_cfg=None):
    from dms_megatron.convert.hf_model import load_hf_into_model, read_hf_model
    from dms_megatron.megatron.model import build_gpt_model

    save_hf_model(hf_model, tmp_path / "hf")
    fam, mc, dms, _, reader, _ = read_hf_model(tmp_path / "hf", divisible_by=HF_DIVISIBLE_BY)
    model = build_gpt_model(mc, dms_cfg, seq_length=16)
    load_hf_into_model(model, reader, fam, mc, dms_cfg)
    return model.eval(), mc


def _logits(megatron_model, hf_model, seq=None):
    ids, pos = tokens()
    if seq is not None:
        ids = torch.randint(0, HF_VOCAB, (1, seq), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(seq)[None]
    with torch.no_grad():
        return megatron_model(ids, pos, None), hf_model(ids, position_ids=pos).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_megatron_logits_equal_transformers(megatron_single, tmp_path, family, tied):
    hf = make_hf_model(family, tied=tied)
    model, mc = _convert(tmp_path, hf)
    assert mc.padded_vocab_size() > HF_VOCAB  # padding is exercised
    ours, ref = _logits(model, hf)
    assert ref.abs().mean() > 0.05  # the comparison is not between two near-zero tensors
    assert torch.allclose(ours[..., :HF_VOCAB], ref, atol=ATOL, rtol=0)
    assert torch.count_nonzero(ours[..., HF_VOCAB:]) == 0  # padded vocab rows are zero


def test_llama3_rope_scaling_is_carried_over(megatron_single, tmp_path):
    """Long sequence: the converted model matches transformers' llama3-scaled RoPE, and (negative control) the same
    weights without the scaling give visibly different logits."""
    hf = make_hf_model("llama", rope_llama3=True)
    model, mc = _convert(tmp_path, hf)
    assert mc.rope_scaling == "llama3" and mc.rope_scaling_factor == 8.0 and mc.rotary_base == 500000.0
    from dms_megatron.megatron.model import build_gpt_model

    ours, ref = _logits(model, hf, seq=LONG_SEQ)
    assert torch.allclose(ours[..., :HF_VOCAB], ref, atol=ATOL, rtol=0)
    unscaled = build_gpt_model(dataclasses.replace(mc, rope_scaling=None), None, seq_length=16).eval()
    unscaled.load_state_dict(model.state_dict())
    ours, ref = _logits(unscaled, hf, seq=LONG_SEQ)
    assert (ours[..., :HF_VOCAB] - ref).abs().max() > 10 * ATOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("source", ["qneuron", "adapter"])
def test_dms_model_in_teacher_runtime_mode_logits_equal_transformers(megatron_single, tmp_path, family, source):
    """A DMS model in teacher mode, initialised from the HF weights, computes the original model."""
    from dms_megatron.convert.hf_model import load_hf_into_model, read_hf_model
    from dms_megatron.megatron.model import build_gpt_model

    hf = make_hf_model(family)
    save_hf_model(hf, tmp_path / "hf")
    fam, mc, _, _, reader, _ = read_hf_model(tmp_path / "hf", divisible_by=HF_DIVISIBLE_BY)
    stock = build_gpt_model(mc, None, seq_length=16)
    load_hf_into_model(stock, reader, fam, mc, None)
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    teacher = build_gpt_model(mc, DMSConfig(window=4, alpha_source=source), seq_length=16)
    missing, unexpected = teacher.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all("dms_alpha" in k for k in missing)
    with dms_forward(teacher, DMSRuntime(mode="teacher")):
        ours, ref = _logits(teacher.eval(), hf)
    assert torch.allclose(ours[..., :HF_VOCAB], ref, atol=ATOL, rtol=0)


def test_fused_qkv_layout_hand_worked():
    """2 query heads per group, 2 groups, head_dim 1: rows are [q0 q1 k0 v0 | q2 q3 k1 v1] (megatron group-major)."""
    cfg = type("C", (), dict(num_query_groups=2, kv_channels=1, gqa_factor=2))()
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = FusedQKV().to_megatron([q, k, v], cfg)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    back = FusedQKV().to_hf(fused, cfg)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))
    gate, up = torch.ones(2, 3), torch.zeros(2, 3)
    assert GatedMLP().to_megatron([gate, up], cfg)[:, 0].tolist() == [1, 1, 0, 0]

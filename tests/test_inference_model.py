"""Pure-torch inference model and vanilla engine vs transformers logits (a tiny random model of every registered
family)."""

from __future__ import annotations

import pytest
import torch

from convert_fixtures import FAMILIES, HF_DIVISIBLE_BY, make_hf_model, save_hf_model, tokens
from dms_megatron.config import ModelConfig
from dms_megatron.inference import DecoderModel, Engine, ModelLoadError, load_hf, make_press

ATOL = 2e-5          # fp32, logits of magnitude ~1
PROMPT = 7           # prompt tokens; the rest of the sequence is teacher-forced decode
CHUNK = 3            # prefill chunk (smaller than the prompt: chunking is exercised)


def _ours(hf_model, family):
    mc = ModelConfig.from_hf(hf_model.config.to_dict(), HF_DIVISIBLE_BY)
    assert mc.family == family
    return DecoderModel(mc, dict(hf_model.state_dict()))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_full_forward_matches_transformers(family, tied):
    hf = make_hf_model(family, tied=tied)
    ids, pos = tokens()
    ref = hf(input_ids=ids).logits
    got = _ours(hf, family)(ids)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_prefill_and_decode_match_transformers(family):
    hf = make_hf_model(family)
    ids, _ = tokens()
    ref = hf(input_ids=ids).logits
    engine = Engine(_ours(hf, family), make_press("vanilla"), chunk_size=CHUNK)
    s = engine.new_session(ids.shape[0])
    pre = torch.stack([engine.prefill(s, r, ids[r, :PROMPT]) for r in range(ids.shape[0])])
    torch.testing.assert_close(pre, ref[:, :PROMPT], atol=ATOL, rtol=0)
    for t in range(PROMPT, ids.shape[1]):
        got = engine.decode(s, [0, 1], ids[:, t].tolist())
        torch.testing.assert_close(got, ref[:, t], atol=ATOL, rtol=0)


def test_load_hf_directory_and_bad_checkpoints(tmp_path):
    hf = make_hf_model("qwen3")
    save_hf_model(hf, tmp_path / "m")
    ids, _ = tokens()
    model = load_hf(tmp_path / "m")
    assert model.dms is None
    torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)
    with pytest.raises(ModelLoadError, match="not a DMS checkpoint"):
        load_hf(tmp_path / "m", require_dms=True)
    with pytest.raises(ValueError, match="needs a DMS model"):
        Engine(model, make_press("dms", window=4))
    with pytest.raises(ModelLoadError, match="config.json does not exist"):
        load_hf(tmp_path / "nothing")
    sd = dict(hf.state_dict())
    sd.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelLoadError, match="up_proj.weight' is missing"):
        DecoderModel(model.cfg, sd)

"""Cross-check: the megatron DMS attention in "hard" mode and the inference engine (physical eviction) agree on
logits and on every key's eviction flag, after renaming the megatron weights to HF names in memory."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model_config
from dms_megatron.config import DMSConfig
from dms_megatron.inference import Engine, from_megatron, make_press

WINDOW = 3
PROMPT = 7
CHUNK = 3
ATOL = 5e-5


@pytest.mark.parametrize("family,source", [("llama", "adapter"), ("qwen3", "qneuron")])
def test_megatron_hard_mode_equals_engine(megatron_single, family, source):
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    extra = {"qwen3": {"family": "qwen3", "qk_layernorm": True}}.get(family, {})
    cfg = tiny_model_config(**extra)
    dms = DMSConfig(window=WINDOW, alpha_source=source)
    torch.manual_seed(0)
    meg = build_gpt_model(cfg, dms, seq_length=TINY_SEQ).eval()
    with torch.no_grad():
        for n, p in meg.named_parameters():
            if n.endswith("dms_alpha_proj.weight"):
                p.normal_(0, 0.05)   # zero-initialised adapter evicts nothing
    ids = torch.randint(0, TINY_VOCAB, (1, TINY_SEQ), generator=torch.Generator().manual_seed(1))
    rt = DMSRuntime(mode="hard")
    with torch.no_grad(), dms_forward(meg, rt):
        ref = meg(ids, torch.arange(TINY_SEQ)[None], None)[0, :, :TINY_VOCAB]

    model = from_megatron(meg.state_dict(), cfg, dms)
    eng = Engine(model, make_press("dms", window=WINDOW), chunk_size=CHUNK)
    s = eng.new_session(1)
    out = [eng.prefill(s, 0, ids[0, :PROMPT])] + [eng.decode(s, [0], [int(t)]) for t in ids[0, PROMPT:]]
    torch.testing.assert_close(torch.cat(out), ref, atol=ATOL, rtol=0)
    evicted = 0
    for i, c in enumerate(s.caches):
        flags = rt.key_flags[i + 1][0]  # [ng, s], final flag per key
        evicted += int(flags.sum())
        for h in range(cfg.num_query_groups):
            held = sorted(c.pos[0, h][c.pos[0, h] >= 0].tolist())
            assert held == [p for p in range(TINY_SEQ) if not (bool(flags[h, p]) and TINY_SEQ - 1 - p > WINDOW)]
    assert evicted > 0, "the test must exercise eviction"

"""DMS inference: physical delayed eviction in the engine vs the hard DMS mask (core.masks) over the full sequence,
vs the independent token-by-token reference decoder, chunking, batching, multi-turn, metrics, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference_fixtures import WINDOW, dms_student, random_ids
from dms_megatron.core.masks import decisions_to_key_logits, dms_hard_bias, eviction_visibility
from dms_megatron.inference import DecoderModel, Engine, make_press
from dms_megatron.inference import cache as kv

ATOL = 2e-5
SEQ = 20            # tokens per sequence
PROMPT = 8          # prompt part; the rest is teacher-forced decode
CHUNK = 3

VARIANTS = [("llama", "qneuron", "head"), ("qwen3", "qneuron", "layer"), ("qwen2", "adapter", "head")]


def _model(family, source, per, **kw):
    sd, mc, dms = dms_student(family, source, per, **kw)
    return DecoderModel(mc, sd, dms)


def hard_mask_forward(model, ids):
    """Full-sequence forward where every layer applies dms_hard_bias to its own decisions; also returns the
    per-layer eviction flags [1, ng, T]."""
    flags = {}

    def attend(i, q, k, v, dec):
        evict = decisions_to_key_logits(dec > 0, fill=False)  # [b, ng, T]
        flags[i] = evict
        g = q.shape[1] // k.shape[1]
        bias = dms_hard_bias(evict, model.dms.window).repeat_interleave(g, 1)  # [b, np, T, T]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                              attn_mask=bias, scale=model.softmax_scale)

    return model(ids[None], attend=attend)[0], flags


def run_engine(model, ids, prompt=PROMPT, chunk=CHUNK):
    eng = Engine(model, make_press("dms", window=model.dms.window), chunk_size=chunk)
    s = eng.new_session(1)
    out = [eng.prefill(s, 0, ids[:prompt])]
    for t in range(prompt, ids.numel()):
        out.append(eng.decode(s, [0], [int(ids[t])]))
    return torch.cat(out), eng, s


def live_positions(session, row=0):
    """Per layer and KV head, the sorted positions held."""
    return [[sorted(c.pos[row, h][c.pos[row, h] >= 0].tolist()) for h in range(c.pos.shape[1])]
            for c in session.caches]


@pytest.mark.parametrize("family,source,per", VARIANTS)
def test_teacher_forced_decode_equals_hard_mask_forward(family, source, per):
    model = _model(family, source, per)
    ids = random_ids(SEQ)
    ref, flags = hard_mask_forward(model, ids)
    got, eng, s = run_engine(model, ids)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # eviction really happened, and the cache holds exactly the tokens the rule still shows to the next query
    total_flags = sum(int(f.sum()) for f in flags.values())
    assert 0 < total_flags < sum(f.numel() for f in flags.values())
    for i, layer in enumerate(live_positions(s)):
        for h, held in enumerate(layer):
            f = flags[i][0, h]
            expect = [p for p in range(SEQ) if not (bool(f[p]) and SEQ - 1 - p > WINDOW)]
            assert held == expect, (i, h)


def test_decode_matches_independent_reference_decoder():
    """The coordinator's plain reference (megatron names, python-list cache) agrees on logits and on resident counts."""
    from reference_decoder import ReferenceDecoder
    from dms_megatron.families import family_by_name
    from dms_megatron.families.rules import bind_rules

    sd, mc, dms = dms_student("qwen3", "qneuron")
    meg = {b.megatron: b.rule.transform.to_megatron([sd[n] for n in b.hf], mc)
           for b in bind_rules(family_by_name("qwen3").rules, mc)}
    ref_dec = ReferenceDecoder(meg, mc, qneuron=True, window=dms.window, evict=True)
    ids = random_ids(SEQ, seed=3)
    ref = ref_dec.run(ids.tolist())[:, : mc.vocab_size]
    got, eng, s = run_engine(DecoderModel(mc, sd, dms), ids, prompt=1)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)
    assert s.metrics[0].resident == ref_dec.resident_history[-1]
    assert s.metrics[0].peak_resident == max(ref_dec.resident_history)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_prefill_equals_unchunked(chunk):
    model = _model("llama", "qneuron", "head")
    ids = random_ids(SEQ, seed=1)
    full, _, s_full = run_engine(model, ids, prompt=SEQ - 2, chunk=SEQ)
    got, _, s = run_engine(model, ids, prompt=SEQ - 2, chunk=chunk)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    assert live_positions(s) == live_positions(s_full)


def test_batch_with_different_lengths_equals_each_alone():
    model = _model("qwen2", "adapter", "head")
    prompts = [random_ids(5, seed=4), random_ids(11, seed=5)]
    follow = [random_ids(7, seed=6), random_ids(7, seed=7)]
    eng = Engine(model, make_press("dms", window=WINDOW), chunk_size=4)
    s = eng.new_session(2)
    for r in range(2):
        eng.prefill(s, r, prompts[r])
    batched = torch.stack([eng.decode(s, [0, 1], [int(follow[0][t]), int(follow[1][t])]) for t in range(7)], 1)
    for r in range(2):
        alone, _, s1 = run_engine(model, torch.cat([prompts[r], follow[r]]), prompt=prompts[r].numel(), chunk=4)
        torch.testing.assert_close(batched[r], alone[prompts[r].numel():], atol=ATOL, rtol=0)
        assert live_positions(s, r) == live_positions(s1)
        assert s.metrics[r].kv_reads == s1.metrics[0].kv_reads


def test_multi_turn_equals_one_long_prefill():
    """prefill -> decode -> prefill -> decode == the whole conversation as one sequence."""
    model = _model("llama", "qneuron", "head")
    ids = random_ids(SEQ + 4, seed=8)
    turns = [(0, 6, "prefill"), (6, 9, "decode"), (9, 17, "prefill"), (17, SEQ + 4, "decode")]
    eng = Engine(model, make_press("dms", window=WINDOW), chunk_size=CHUNK)
    s = eng.new_session(1)
    out = []
    for a, b, kind in turns:
        if kind == "prefill":
            out.append(eng.prefill(s, 0, ids[a:b]))
        else:
            out += [eng.decode(s, [0], [int(ids[t])]) for t in range(a, b)]
    ref, _ = hard_mask_forward(model, ids)
    torch.testing.assert_close(torch.cat(out), ref, atol=ATOL, rtol=0)


def test_metrics_reads_and_residency_follow_the_rule():
    """kv_reads = sum over decode queries, layers and heads of the keys eviction_visibility shows; residency = keys
    still visible to the next query; CR = vanilla / actual."""
    model = _model("qwen3", "qneuron", "head")
    ids = random_ids(SEQ, seed=9)
    _, flags = hard_mask_forward(model, ids)
    _, eng, s = run_engine(model, ids)
    m = s.metrics[0]
    reads = sum(int(eviction_visibility(f[0], WINDOW)[:, PROMPT:].sum()) for f in flags.values())
    assert m.kv_reads == reads
    L, ng = model.cfg.num_layers, model.cfg.num_query_groups
    assert m.vanilla_reads == L * ng * sum(range(PROMPT + 1, SEQ + 1))
    held = sum(int(eviction_visibility(f[0], WINDOW)[:, -1].sum()) for f in flags.values())
    assert m.resident == held
    row = eng.summary(s)[0]
    assert row["cr_final"] == pytest.approx(L * ng * SEQ / held)
    # core.compression's CR: key slots / slots never flagged (the last token's decision is not made: kept)
    flagged = sum(int(f.sum()) for f in flags.values())
    assert 0 < flagged and row["achieved_cr"] == pytest.approx(L * ng * SEQ / (L * ng * SEQ - flagged))
    assert row["cr_reads"] == pytest.approx(m.vanilla_reads / reads) and row["cr_reads"] > 1


def test_eviction_bookkeeping_hand_worked():
    """Window 2; decisions produced at t=1..5: 1, 0, 1, 1, 0 flag tokens 0, 2, 3. With newest token 5, tokens more
    than 2 behind (0, 1, 2) are dropped if flagged (0 and 2); 3 is flagged but still inside the window."""
    c = kv.new_layer_cache(1, 1, 2, capacity=2)
    rows = torch.tensor([0])
    dec = torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0, -1.0])
    for t in range(6):
        kv.flag_previous(c, rows, torch.tensor([t]), dec[t].view(1, 1))
        kv.insert(c, rows, torch.full((1, 1, 1, 2), float(t)), torch.zeros(1, 1, 1, 2), torch.tensor([[t]]),
                  torch.zeros(1, 1, 1, dtype=torch.bool))
        kv.drop(c, rows, kv.expired(c, rows, torch.tensor([t]), 2))
    live = c.pos[0, 0] >= 0
    assert sorted(c.pos[0, 0][live].tolist()) == [1, 3, 4, 5]
    assert sorted(c.pos[0, 0][live & c.flag[0, 0]].tolist()) == [3]
    # slot reuse: 6 slots were never needed at once
    assert c.capacity <= 8


def test_bad_input_fails_clearly(tmp_path):
    model = _model("llama", "qneuron", "head")
    eng = Engine(model, make_press("dms", window=WINDOW), max_length=12)
    s = eng.new_session(1)
    with pytest.raises(ValueError, match="prompt of sequence 0 is empty"):
        eng.prefill(s, 0, [])
    with pytest.raises(ValueError, match="maximum length 12"):
        eng.prefill(s, 0, random_ids(13))
    with pytest.raises(ValueError, match="no context; prefill a prompt first"):
        eng.decode(s, [0], [1])
    eng.prefill(s, 0, random_ids(12))
    with pytest.raises(ValueError, match="would reach 13 tokens"):
        eng.decode(s, [0], [1])
    sd, mc, dms = dms_student("llama", "qneuron")
    from dms_megatron.config import DMSConfig
    from dms_megatron.inference import ModelLoadError
    with pytest.raises(ModelLoadError, match="dms_proj_alpha.*no DMS adapter"):
        DecoderModel(mc, sd, DMSConfig(window=WINDOW, alpha_source="adapter"))

"""Baseline presses: hand-checked keep / read sets on tiny caches, and engine-level behaviour against vanilla."""

from __future__ import annotations

import pytest
import torch

from convert_fixtures import make_hf_model
from inference_fixtures import model_config, random_ids
from dms_megatron.inference import DecoderModel, Engine, make_press
from dms_megatron.inference import cache as kv

ATOL = 2e-5
ROWS = torch.tensor([0])


def _cache(n_tokens, head_dim=2, keys=None):
    """One sequence, one KV head, tokens 0..n-1 in slots 0..n-1."""
    c = kv.new_layer_cache(1, 1, head_dim, capacity=n_tokens)
    for t in range(n_tokens):
        k = torch.zeros(1, 1, 1, head_dim) if keys is None else keys[t].view(1, 1, 1, head_dim)
        kv.insert(c, ROWS, k, torch.zeros(1, 1, 1, head_dim), torch.tensor([[t]]), torch.zeros(1, 1, 1, dtype=torch.bool))
    return c


def _held(c, row=0, head=0):
    return sorted(c.pos[row, head][c.pos[row, head] >= 0].tolist())


def test_h2o_keeps_recent_plus_heavy_hitters_by_accumulated_attention():
    c = _cache(8)
    c.score[0, 0, 4] = 0.25                                  # attention accumulated by earlier queries
    probs = torch.tensor([0.30, 0.05, 0.20, 0.01, 0.10, 0.02, 0.12, 0.20]).view(1, 1, 1, 1, 8)
    make_press("h2o", budget=4, recent=2).after_attention(c, ROWS, probs, torch.tensor([7]))
    # recent: 6, 7; heavy among 0..5 by accumulated score: 4 (0.35), 0 (0.30)
    assert _held(c) == [0, 4, 6, 7]


def test_tova_drops_what_the_last_query_attends_to_least():
    c = _cache(6)
    first = torch.tensor([0.0, 0.0, 0.9, 0.1, 0.0, 0.0])   # an earlier query of the chunk: ignored
    last_h0 = torch.tensor([0.1, 0.3, 0.05, 0.2, 0.15, 0.2])
    last_h1 = torch.tensor([0.1, 0.3, 0.05, 0.2, 0.25, 0.1])
    probs = torch.stack([torch.stack([first, last_h0]), torch.stack([first, last_h1])]).view(1, 1, 2, 2, 6)
    make_press("tova", budget=4).after_attention(c, ROWS, probs, torch.tensor([5]))
    # mean over the two query heads of the group: [0.1, 0.3, 0.05, 0.2, 0.2, 0.15] -> drop 2 and 0
    assert _held(c) == [1, 3, 4, 5]


def test_streamingllm_keeps_sinks_and_recent_window():
    c = _cache(12)
    make_press("streamingllm", budget=6, sinks=2).after_attention(c, ROWS, None, torch.tensor([11]))
    assert _held(c) == [0, 1, 8, 9, 10, 11]


def test_quest_reads_newest_page_and_top_upper_bound_page():
    keys = torch.tensor([[0.1, 0.0], [0.2, 0.1],      # page 0: bound 0.2 + 0.0 = 0.2
                         [1.0, 2.0], [-1.0, 0.0],     # page 1: bound 1.0 + 0.0 = 1.0
                         [0.5, -1.0], [0.0, 0.0],     # page 2: bound 0.5 + 1.0 = 1.5
                         [-3.0, 3.0], [0.0, 0.0]])    # page 3: newest, always read
    c = _cache(8, keys=keys)
    q = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    vis = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    read = make_press("quest", budget=4, page=2).read_mask(c, ROWS, q, vis)
    assert read[0, 0, 0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert _held(c) == list(range(8))                    # Quest keeps the whole cache


@pytest.fixture(scope="module")
def plain_model():
    hf = make_hf_model("llama")
    return DecoderModel(model_config(hf, "llama"), dict(hf.state_dict()))


def _run(model, press, ids, prompt, chunk=4):
    eng = Engine(model, press, chunk_size=chunk)
    s = eng.new_session(1)
    out = [eng.prefill(s, 0, ids[:prompt])]
    out += [eng.decode(s, [0], [int(ids[t])]) for t in range(prompt, ids.numel())]
    return torch.cat(out), s


SEQ, PROMPT, BUDGET = 16, 10, 6


@pytest.mark.parametrize("name", ["tova", "h2o", "streamingllm", "quest"])
def test_budget_at_least_context_equals_vanilla(plain_model, name):
    ids = random_ids(SEQ, seed=2)
    ref, _ = _run(plain_model, make_press("vanilla"), ids, PROMPT)
    got, _ = _run(plain_model, make_press(name, budget=SEQ), ids, PROMPT)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tova", "h2o", "streamingllm"])
def test_eviction_presses_hold_the_budget(plain_model, name):
    ids = random_ids(SEQ, seed=2)
    _, s = _run(plain_model, make_press(name, budget=BUDGET), ids, PROMPT)
    L, ng = plain_model.cfg.num_layers, plain_model.cfg.num_query_groups
    m = s.metrics[0]
    assert m.resident == L * ng * BUDGET
    assert m.kv_reads == (SEQ - PROMPT) * L * ng * (BUDGET + 1)   # budget + the new token, then evict
    if name == "streamingllm":
        assert all(_held(s.caches[i], 0, h) == [0, 1, 2, 3, 14, 15] for i in range(L) for h in range(ng))


def test_quest_keeps_everything_reads_the_budget(plain_model):
    ids = random_ids(SEQ, seed=2)
    ref, _ = _run(plain_model, make_press("vanilla"), ids, PROMPT)
    got, s = _run(plain_model, make_press("quest", budget=4, page=2), ids, PROMPT)
    L, ng = plain_model.cfg.num_layers, plain_model.cfg.num_query_groups
    m = s.metrics[0]
    assert m.resident == L * ng * SEQ
    assert m.kv_reads <= (SEQ - PROMPT) * L * ng * 4 < m.vanilla_reads
    torch.testing.assert_close(got[:PROMPT], ref[:PROMPT], atol=ATOL, rtol=0)   # prefill is exact


def test_press_arguments_fail_clearly():
    with pytest.raises(ValueError, match="budget=None must be an integer"):
        make_press("h2o")
    with pytest.raises(ValueError, match="window=None"):
        make_press("dms")
    with pytest.raises(ValueError, match="unknown; allowed"):
        make_press("snapkv", budget=4)


def test_press_settings_have_one_default_shared_by_generate_and_eval():
    import inspect
    from dataclasses import asdict

    from dms_megatron.config import TINY_TEACHER, ConfigError, PressConfig, RefitConfig
    from dms_megatron.eval.config import EvalConfig
    from dms_megatron.inference.press import REGISTRY

    for cls in REGISTRY.values():  # no press keeps a default of its own
        own = [p.name for p in inspect.signature(cls.__init__).parameters.values()
               if p.name not in ("self", "budget", "window") and p.default is not inspect.Parameter.empty]
        assert own == [], (cls.name, own)
    d = PressConfig()
    assert make_press("quest", budget=64).page == d.quest_page                 # what dms-generate builds
    assert make_press("streamingllm", budget=64).sinks == d.streamingllm_sinks
    assert make_press("h2o", budget=9).recent == 4 and d.h2o_recent_fraction == 0.5   # half, rounded down
    assert EvalConfig(RefitConfig(TINY_TEACHER)).press == d                                             # what dms-eval builds
    custom = PressConfig(streamingllm_sinks=6, quest_page=8)
    assert make_press("quest", budget=64, settings=custom).page == 8
    assert make_press("quest", budget=5, settings=custom).page == 5            # clamped to the budget
    assert make_press("streamingllm", budget=5, settings=custom).sinks == 4    # at most budget - 1
    with pytest.raises(ConfigError, match=r"press.quest_page=0 is invalid: must be an integer >= 1"):
        EvalConfig.from_dict({"refit": {"model": asdict(TINY_TEACHER)}, "press": {"quest_page": 0}})
    with pytest.raises(ValueError, match="budget=0 must be an integer >= 1"):
        make_press("streamingllm", budget=0)

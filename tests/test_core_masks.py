"""The delayed-eviction rule and its biases against hand-worked examples and independent loops."""

import math

import pytest
import torch

from dms_megatron.core.masks import (
    causal_bias,
    decisions_to_key_logits,
    dms_hard_bias,
    dms_soft_bias,
    eviction_visibility,
)

T = 6
W = 2


def test_toy_example_by_hand():
    # Decisions produced at each position t (1 = "evict the previous token"). Position 2 flags key 1,
    # position 4 flags key 3; position 0's decision has no key (dropped by the shift).
    produced = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)
    evict = decisions_to_key_logits(produced, fill=False)
    assert evict.tolist() == [False, True, False, True, False, False]
    vis = eviction_visibility(evict, W).int()
    # Key 1 is visible to queries 1, 2, 3 (q - 1 <= 2) and gone from query 4 on; key 3 visible to 3, 4, 5.
    expected = torch.tensor([
        # k: 0  1  2  3  4  5
        [1, 0, 0, 0, 0, 0],  # q0
        [1, 1, 0, 0, 0, 0],  # q1
        [1, 1, 1, 0, 0, 0],  # q2
        [1, 1, 1, 1, 0, 0],  # q3
        [1, 0, 1, 1, 1, 0],  # q4
        [1, 0, 1, 1, 1, 1],  # q5
    ])
    assert torch.equal(vis, expected)


def test_window_zero_drops_flagged_key_immediately():
    evict = torch.tensor([True, False, True, False])
    vis = eviction_visibility(evict, 0).int()
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 1]])
    assert torch.equal(vis, expected)


def test_large_window_is_plain_causal():
    evict = torch.ones(T, dtype=torch.bool)
    vis = eviction_visibility(evict, T)
    assert torch.equal(vis, torch.tril(torch.ones(T, T, dtype=torch.bool)))


def test_all_evicted_leaves_only_the_window():
    evict = torch.ones(T, dtype=torch.bool)
    vis = eviction_visibility(evict, W)
    for q in range(T):
        assert vis[q].nonzero().flatten().tolist() == list(range(max(0, q - W), q + 1))


def test_chunked_queries_are_the_last_rows():
    evict = torch.tensor([False, True, False, True, True, False, False])
    full = eviction_visibility(evict, W)
    assert torch.equal(eviction_visibility(evict, W, q_len=3), full[-3:])


def test_batched_leading_dims():
    evict = torch.rand(2, 3, T) > 0.5
    vis = eviction_visibility(evict, W)
    assert vis.shape == (2, 3, T, T)
    assert torch.equal(vis[1, 2], eviction_visibility(evict[1, 2], W))


def _loop_soft_bias(z, window):
    t = z.shape[-1]
    out = torch.zeros(t, t, dtype=torch.float64)
    for q in range(t):
        for k in range(t):
            if k > q:
                out[q, k] = -math.inf
            elif q - k > window:
                out[q, k] = math.log(1.0 - 1.0 / (1.0 + math.exp(-float(z[k]))))
    return out


def test_soft_bias_matches_loop():
    torch.manual_seed(0)
    z = torch.randn(T, dtype=torch.float64) * 3
    assert torch.allclose(dms_soft_bias(z, W), _loop_soft_bias(z, W), atol=1e-12)


def test_hard_bias_matches_visibility_and_causal_bias():
    evict = torch.tensor([False, True, True, False, True, False])
    hb = dms_hard_bias(evict, W)
    assert torch.equal(hb == 0, eviction_visibility(evict, W))
    assert torch.equal(dms_hard_bias(torch.zeros(T, dtype=torch.bool), W), causal_bias(T, T))


def test_shift_fill_for_logits():
    z = torch.tensor([0.5, -1.0, 2.0])
    assert decisions_to_key_logits(z).tolist() == [-1.0, 2.0, float("-inf")]


def test_negative_window_rejected():
    with pytest.raises(ValueError, match="window"):
        eviction_visibility(torch.zeros(3, dtype=torch.bool), -1)

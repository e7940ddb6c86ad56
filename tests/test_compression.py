"""core.compression: the one achieved-CR definition against hand counts on crafted decisions."""

import pytest
import torch

from dms_megatron.core.compression import (achieved_cr, cr_from_evicted_fraction, evicted_key_fraction,
                                           key_slot_flags)


def _decisions():
    """2 sequences x 2 KV heads x 6 positions; sequence 1 has 2 padding positions at the end (valid False)."""
    d = torch.tensor([[[1, 1, 0, 1, 0, 1],    # seq 0, head 0: decisions at positions 1..5 flag keys 0, 2, 4
                       [0, 0, 1, 1, 1, 0]],   # head 1: keys 1, 2, 3
                      [[1, 0, 1, 1, 1, 1],    # seq 1, head 0: positions 1..3 real -> keys 1, 2 (4, 5: padding)
                       [0, 1, 0, 0, 1, 1]]],  # head 1: key 0 (position 4's decision is padding's)
                     dtype=torch.float32)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    return d, valid


def test_key_slot_flags_follow_the_counting_rule_by_hand():
    d, valid = _decisions()
    evicted, slots = key_slot_flags(d, valid)
    assert evicted.tolist() == [[[1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]],
                                [[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]]
    assert slots[:, 0].tolist() == valid.tolist()  # padding keys are no slots; EOS would be a real token


def test_evicted_fraction_and_cr_by_hand():
    d, valid = _decisions()
    # seq 0: 12 slots (2 heads x 6 keys), 6 evicted; seq 1: 8 slots (2 heads x 4 real keys), 3 evicted
    assert evicted_key_fraction(d, valid).tolist() == [6 / 12, 3 / 8]
    # pooled: 20 slots, 11 kept -> 20 / 11 (a mean of per-sample ratios would give (2 + 8/5) / 2 = 1.8)
    evicted, slots = key_slot_flags(d, valid)
    kept = float(slots.sum()) * d.shape[1] - float(evicted.sum())
    assert achieved_cr(kept, float(slots.sum()) * d.shape[1]) == pytest.approx(20 / 11)
    assert cr_from_evicted_fraction(9 / 20) == pytest.approx(20 / 11)


def test_last_key_and_position_zero_decision():
    d = torch.ones(1, 1, 4)  # every position says "evict the previous key"
    assert key_slot_flags(d)[0].tolist() == [[[1, 1, 1, 0]]]  # the last key has no decision yet: kept
    assert evicted_key_fraction(d).tolist() == [3 / 4]  # position 0's decision concerns no key
    assert achieved_cr(1.0, 4.0) == 4.0 and achieved_cr(0.0, 4.0) == float("inf") and achieved_cr(0.0, 0.0) == 1.0


def test_fraction_is_differentiable_in_the_decisions():
    d, valid = _decisions()
    d.requires_grad_(True)
    evicted_key_fraction(d, valid).sum().backward()
    # position 0 and padding positions carry no gradient; seq 1's position 3 decides about key 2 (real)
    assert d.grad[:, :, 0].abs().sum() == 0 and d.grad[1, :, 4:].abs().sum() == 0
    assert float(d.grad[1, 0, 3]) == pytest.approx(1 / 8)

"""Gating, deterministic noise, losses and the CR schedule against hand computations."""

import math

import pytest
import torch

from dms_megatron.core.gating import (
    apply_alpha_per,
    gumbel_sigmoid,
    logistic_noise,
    qneuron_decision_logits,
    zero_borrowed_neuron,
)
from dms_megatron.core.losses import (band_lower_fraction, band_upper_fraction, compression_loss, cr_at_step, kd_loss,
                                      target_evicted_fraction)


def test_qneuron_picks_last_dim_of_first_head_per_group():
    # 4 query heads, 2 groups -> heads 0 and 2 are the first of their group; head dim 3.
    q = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # [np, hn]
    logits = qneuron_decision_logits(q, num_groups=2, scale=100.0, offset=5.0)
    assert logits.tolist() == [2 * 100 - 5, 8 * 100 - 5]
    z = zero_borrowed_neuron(q, 2)
    expected = q.clone()
    expected[0, 2] = 0
    expected[2, 2] = 0
    assert torch.equal(z, expected)


def test_alpha_per_layer_broadcasts_head_zero():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert apply_alpha_per(x, "layer").tolist() == [[1.0, 1.0, 1.0]]
    assert apply_alpha_per(x, "head").tolist() == [[1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="alpha_per"):
        apply_alpha_per(x, "token")


def test_gumbel_sigmoid_straight_through():
    logits = torch.tensor([-1.0, 0.2, 3.0], requires_grad=True)
    noise = torch.tensor([0.5, -0.5, 0.0])
    tau = 0.5
    probs, hard, noisy = gumbel_sigmoid(logits, noise, tau)
    assert torch.allclose(noisy, torch.tensor([-1.0, -0.6, 6.0]))
    assert hard.tolist() == [0.0, 0.0, 1.0]
    hard.sum().backward()
    p = torch.sigmoid(torch.tensor([-1.0, -0.6, 6.0]))
    assert torch.allclose(logits.grad, p * (1 - p) / tau)


def test_noise_is_deterministic_and_layout_independent():
    s, h, p = torch.arange(4), torch.arange(4), torch.arange(50)
    a = logistic_noise(7, 3, 2, s, h, p)
    assert torch.equal(a, logistic_noise(7, 3, 2, s, h, p))
    # heads 2..3 on another tensor-parallel rank, samples 1..2 on another data-parallel rank
    assert torch.equal(logistic_noise(7, 3, 2, s, torch.tensor([2, 3]), p), a[:, 2:])
    assert torch.equal(logistic_noise(7, 3, 2, torch.tensor([1, 2]), h, p), a[1:3])
    for other in (logistic_noise(8, 3, 2, s, h, p), logistic_noise(7, 4, 2, s, h, p), logistic_noise(7, 3, 3, s, h, p)):
        assert not torch.equal(other, a)


def test_noise_is_logistic():
    n = logistic_noise(0, 0, 1, torch.arange(64), torch.arange(8), torch.arange(512)).double()
    assert abs(n.mean().item()) < 0.03
    assert abs(n.var().item() - math.pi ** 2 / 3) < 0.1
    # P(noise < 1) for Logistic(0, 1) is sigmoid(1)
    assert abs((n < 1).double().mean().item() - 1 / (1 + math.exp(-1))) < 0.01


def test_cr_schedule_official_values():
    assert cr_at_step(0, 1.0, 16.0, 510) == 1.0
    assert cr_at_step(255, 1.0, 16.0, 510) == pytest.approx(8.5)
    assert cr_at_step(510, 1.0, 16.0, 510) == 16.0
    assert cr_at_step(10_000, 1.0, 16.0, 510) == 16.0
    assert target_evicted_fraction(4.0) == pytest.approx(0.75)
    assert target_evicted_fraction(1.0) == 0.0
    with pytest.raises(ValueError):
        target_evicted_fraction(0.5)
    with pytest.raises(ValueError):
        cr_at_step(1, 1.0, 2.0, 0)


def test_compression_loss_is_one_sided():
    frac = torch.tensor([0.5, 0.9])
    # target 0.75: sample 0 is short by 0.25, sample 1 over-evicts (costs nothing) -> mean 0.125
    assert compression_loss(frac, 0.75).item() == pytest.approx(0.125)
    assert compression_loss(torch.tensor([0.8, 0.9]), 0.75).item() == 0.0
    assert compression_loss(torch.tensor([0.8, 0.9]), 0.75, upper=None).item() == 0.0


def test_band_upper_fraction_hand_values():
    # CR 4 with a 10% band: CR 4.4 -> evicted fraction 1 - 1/4.4 = 0.772727...
    assert band_upper_fraction(4.0, 0.1) == pytest.approx(1 - 1 / 4.4)
    assert band_upper_fraction(8.0, 0.0) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="band"):
        band_upper_fraction(4.0, -0.1)


def test_band_lower_fraction_hand_values():
    # CR 4 with a 10% band: CR 3.6 -> evicted fraction 1 - 1/3.6 = 0.72222...; CR 8, 5%: 1 - 1/7.6
    assert band_lower_fraction(4.0, 0.1) == pytest.approx(1 - 1 / 3.6)
    assert band_lower_fraction(8.0, 0.05) == pytest.approx(1 - 1 / 7.6)
    # early in the schedule (CR 1.02) the band's lower edge is below CR 1: nothing is charged for keeping everything
    assert band_lower_fraction(1.02, 0.05) == 0.0
    assert band_lower_fraction(4.0, 0.0) == pytest.approx(0.75)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="band"):
            band_lower_fraction(4.0, bad)


def test_band_compression_loss_values_and_gradients_below_inside_above():
    # target 0.75, upper 0.8; samples below (0.5), inside (0.78) and above (0.9) the band
    frac = torch.tensor([0.5, 0.78, 0.9], requires_grad=True)
    loss = compression_loss(frac, 0.75, upper=0.8)
    # (0.25 + 0 + 0.1) / 3
    assert loss.item() == pytest.approx(0.35 / 3)
    loss.backward()
    # d/df: -1/3 below (evict more), 0 inside, +1/3 above (evict less)
    assert frac.grad.tolist() == pytest.approx([-1 / 3, 0.0, 1 / 3])
    # the one-sided loss at the same points: only the shortfall, no gradient above the target
    frac.grad = None
    compression_loss(frac, 0.75).backward()
    assert frac.grad.tolist() == pytest.approx([-1 / 3, 0.0, 0.0])
    # band of width 0: |frac - target|
    assert compression_loss(torch.tensor([0.7, 0.8]), 0.75, upper=0.75).item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="below the target"):
        compression_loss(frac, 0.75, upper=0.7)


def test_kd_loss_hand_computation():
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    kl_st = [(ps[i] * (ps[i].log() - pt[i].log())).sum().item() for i in range(2)]
    kl_ts = [(pt[i] * (pt[i].log() - ps[i].log())).sum().item() for i in range(2)]
    assert kl_st[1] == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(s, t).item() == pytest.approx(sum(kl_st) / 2, rel=1e-5)
    assert kd_loss(s, t, direction="teacher_student").item() == pytest.approx(sum(kl_ts) / 2, rel=1e-5)
    assert kd_loss(s, t, torch.tensor([True, False])).item() == pytest.approx(kl_st[0], rel=1e-5)
    # by hand: p_s uniform, p_t = softmax([0,0,1]); KL = log(1/3) - mean(log p_t)
    lse = math.log(2 + math.e)
    assert kl_st[0] == pytest.approx(math.log(1 / 3) - (0 - lse + 0 - lse + 1 - lse) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="direction"):
        kd_loss(s, t, direction="js")

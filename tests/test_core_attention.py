"""DMS attention kernels against an independent per-head, per-query loop; flex == dense."""

import math

import pytest
import torch

from attention_inputs import random_qkvz

from dms_megatron.core.attention import dense_dms_attention, flex_dms_attention

B, NP, HN, W = 2, 4, 8, 3


def _loop_attention(q, k, v, z, window, hard):
    """Independent reference: softmax over keys per (batch, head, query) with the DMS rule in the loop."""
    b, np_, sq, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    g = np_ // ng
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(np_):
            kh = h // g
            for i in range(sq):
                qpos = sk - sq + i
                scores, vals = [], []
                for kk in range(qpos + 1):
                    s = float(q[bi, h, i] @ k[bi, kh, kk]) / math.sqrt(hn)
                    if z is not None and qpos - kk > window:
                        zk = float(z[bi, kh, kk])
                        if hard:
                            if zk > 0:
                                continue
                        else:
                            s += -math.log1p(math.exp(zk)) if zk < 30 else -zk  # log(1 - sigmoid(z))
                    scores.append(s)
                    vals.append(v[bi, kh, kk])
                p = torch.softmax(torch.tensor(scores, dtype=q.dtype), 0)
                out[bi, h, i] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


def _inputs(ng, sq, sk, seed=0, dtype=torch.float64):
    return random_qkvz(B, NP, ng, sq, sk, HN, seed, dtype)


@pytest.mark.parametrize("ng", [1, 2, 4])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("sq,sk", [(10, 10), (4, 10)])
def test_dense_matches_loop(ng, hard, sq, sk):
    q, k, v, z = _inputs(ng, sq, sk)
    ref = _loop_attention(q, k, v, z, W, hard)
    got = dense_dms_attention(q, k, v, z, W, hard=hard)
    assert torch.allclose(got, ref, atol=1e-10)


def test_dense_without_logits_is_causal_attention():
    q, k, v, _ = _inputs(2, 7, 7)
    assert torch.allclose(dense_dms_attention(q, k, v, None, W), _loop_attention(q, k, v, None, W, False), atol=1e-10)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("ng,sq,sk", [(2, 16, 16), (1, 5, 16), (4, 16, 16)])
def test_flex_forward_equals_dense(hard, ng, sq, sk):
    q, k, v, z = _inputs(ng, sq, sk, dtype=torch.float32)
    assert torch.allclose(flex_dms_attention(q, k, v, z, W, hard=hard), dense_dms_attention(q, k, v, z, W, hard=hard),
                          atol=1e-5)


@pytest.mark.parametrize("sq,sk", [(300, 300), (129, 513), (1, 300), (256, 256)])
def test_flex_block_mask_handles_ragged_and_offset_tiles(sq, sk):
    # several 128-wide tiles: full, partial and ragged edge tiles of the hand-built causal block mask
    q, k, v, z = _inputs(2, sq, sk, dtype=torch.float32)
    for hard in (False, True):
        assert torch.allclose(flex_dms_attention(q, k, v, z, 7, hard=hard), dense_dms_attention(q, k, v, z, 7, hard=hard),
                              atol=1e-5)


def test_gradients_wrt_key_logits_match_finite_differences():
    q, k, v, z = _inputs(2, 6, 6)
    z = z[..., :-1].clone().requires_grad_(True)

    def f(zz):
        full = torch.cat([zz, torch.full_like(zz[..., :1], -float("inf"))], dim=-1)
        return dense_dms_attention(q, k, v, full, 1)

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-6)

"""The exact two-part split (far part + window band, merged by log-sum-exp) against the dense kernel and the
independent per-query loop; its memory stays O(L * chunk).

  python -m pytest tests/test_two_part.py
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attention_inputs import loop_attention

from dms_megatron.core.dense_dms import dense_dms_attention
from dms_megatron.core.two_part import _merge, two_part_dms_attention, two_part_dms_attention_parts
from attention_inputs import random_qkvz


def _inputs(b, np_, ng, sq, sk, hn=8, seed=0):
    return random_qkvz(b, np_, ng, sq, sk, hn, seed)


def _fwd_bwd(fn, q, k, v, z, go):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    zl = None if z is None else z.clone().requires_grad_(True)
    out = fn(*leaves, zl)
    out.backward(go)
    return out.detach(), [t.grad for t in leaves] + ([] if zl is None else [zl.grad])


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("ng,sq,sk,w,chunk", [
    (2, 23, 23, 4, 5),     # GQA 2, ragged chunks
    (4, 23, 23, 2, 256),   # MHA, one chunk
    (1, 9, 30, 6, 4),      # sq < sk, GQA 4
    (2, 20, 20, 0, 7),     # window 0: the band is the diagonal
    (2, 20, 20, 50, 7),    # window > L: no far part
])
def test_two_part_matches_dense_and_loop(ng, sq, sk, w, chunk, hard):
    q, k, v, z = _inputs(2, 4, ng, sq, sk)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    fn = lambda *a: two_part_dms_attention_parts(*a, w, hard=hard, parts="torch", chunk=chunk)  # noqa: E731
    out, grads = _fwd_bwd(fn, q, k, v, z, go)
    ref_out, ref_grads = _fwd_bwd(lambda *a: dense_dms_attention(*a, w, hard=hard), q, k, v, z, go)
    loop = loop_attention(q.double(), k.double(), v.double(), z.double(), w, hard)
    assert (out.double() - loop).abs().max() <= 1e-5
    assert (out - ref_out).abs().max() <= 1e-5
    for name, g, r in zip("qkvz", grads, ref_grads):
        if hard and name == "z":
            assert g is None and r is None
            continue
        assert (g - r).abs().max() <= 1e-5, name


def test_without_key_logits_is_causal_attention():
    q, k, v, _ = _inputs(1, 4, 2, 11, 17)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    out, grads = _fwd_bwd(lambda q_, k_, v_, _z: two_part_dms_attention(q_, k_, v_, None, 3), q, k, v, None, go)
    ref_out, ref_grads = _fwd_bwd(lambda q_, k_, v_, _z: dense_dms_attention(q_, k_, v_, None, 3), q, k, v, None, go)
    assert (out.double() - loop_attention(q.double(), k.double(), v.double(), None, 3, False)).abs().max() <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-5


def test_merge_is_softmax_over_the_union():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 5, 9, generator=gen)                                         # scores [b, h, q, k]
    s[0, 0, 0, :4] = -float("inf")                                                     # a row empty in part 1
    v = torch.randn(2, 3, 9, 4, generator=gen)
    parts = [(torch.softmax(s[..., sl], -1).nan_to_num() @ v[..., sl, :], s[..., sl].logsumexp(-1))
             for sl in (slice(0, 4), slice(4, 9))]
    out, lse = _merge(*parts[0], *parts[1])
    assert torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-6)
    assert torch.allclose(lse, s.logsumexp(-1), atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_linear_in_length():
    L, chunk = 256, 16
    q, k, v, z = _inputs(1, 4, 2, L, L)
    leaves = [t.requires_grad_(True) for t in (q, k, v, z)]
    with _LargestTensor() as mode:
        two_part_dms_attention_parts(*leaves, 8, parts="torch", chunk=chunk).sum().backward()
    assert mode.largest <= 4 * chunk * L                                               # np * chunk * L, not np * L * L
    assert all(t.grad is not None for t in leaves)


def test_flash_parts_refuse_cpu():
    q, k, v, z = _inputs(1, 2, 1, 6, 6)
    with pytest.raises(ValueError, match="parts='torch'"):
        two_part_dms_attention_parts(q, k, v, z, 2, parts="flash")


def _fake_flash_scores(q, k, scale, window):
    """Reference semantics of torch's flash ops on [b, s, h, d] inputs: causal aligned bottom-right, a window of
    ``window`` keys back (None: unbounded), GQA. Returns scores [b, h, sq, sk] with -inf off the pattern."""
    sq, sk = q.shape[1], k.shape[1]
    g = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk.float()) * scale
    d = (sk - sq + torch.arange(sq))[:, None] - torch.arange(sk)
    ok = (d >= 0) & (d <= (sk if window is None else window))
    return s.masked_fill(~ok, float("-inf")), g


def _fake_flash_fwd(q, k, v, cq, ck, mq, mk, p, causal, dbg, scale=None, window_size_left=None, window_size_right=None):
    assert causal and cq is None and window_size_right in (None, 0)
    s, g = _fake_flash_scores(q, k, scale, window_size_left)
    lse = s.logsumexp(-1)                                                              # [b, h, sq]
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.repeat_interleave(g, dim=2).float())
    return out.to(q.dtype), lse, torch.zeros(2), torch.zeros(0), torch.zeros(0)


def _fake_flash_bwd(do, q, k, v, out, lse, cq, ck, mq, mk, p, causal, rng, unused, scale=None,
                    window_size_left=None, window_size_right=None):
    s, g = _fake_flash_scores(q, k, scale, window_size_left)
    prob = torch.exp(s - lse[..., None])                                               # with the given (global) lse
    vv = v.repeat_interleave(g, dim=2).float()
    dof = do.float()
    dp = torch.einsum("bqhd,bkhd->bhqk", dof, vv)
    ds = prob * (dp - (dof * out.float()).sum(-1).transpose(1, 2)[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.repeat_interleave(g, dim=2).float()) * scale
    fold = lambda t: t.unflatten(2, (k.shape[2], g)).sum(3)                             # noqa: E731  GQA sum
    dk = fold(torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale)
    dv = fold(torch.einsum("bhqk,bqhd->bkhd", prob, dof))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("ng,sq,sk,w", [(2, 23, 23, 4), (1, 9, 30, 6), (2, 20, 20, 0), (2, 20, 20, 50)])
def test_flash_parts_logic_with_reference_flash_ops(monkeypatch, ng, sq, sk, w, hard):
    """The flash parts' plumbing (bias as extra head dims, bottom-right far alignment, slicing, d(bias) from the
    extra key dim) with CPU stand-ins for torch's flash ops; the real kernels are checked by the CUDA tests."""
    from dms_megatron.core import two_part

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", _fake_flash_fwd)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", _fake_flash_bwd)
    q, k, v, z = _inputs(2, 4, ng, sq, sk)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))

    def fn(q_, k_, v_, z_):
        kbias = torch.zeros(z_.shape).masked_fill(z_ > 0, float("-inf")) if hard else torch.nn.functional.logsigmoid(-z_)
        return two_part._TwoPart.apply(q_, k_, v_, kbias, min(w, sk), 1 / 8 ** 0.5, two_part.FlashParts())

    out, grads = _fwd_bwd(fn, q, k, v, z, go)
    ref_out, ref_grads = _fwd_bwd(lambda *a: dense_dms_attention(*a, w, hard=hard), q, k, v, z, go)
    assert (out - ref_out).abs().max() <= 1e-5
    for name, g, r in zip("qkvz", grads, ref_grads):
        if hard and name == "z":
            assert r is None and (g is None or g.abs().max() == 0)
            continue
        assert (g - r).abs().max() <= 1e-5, name

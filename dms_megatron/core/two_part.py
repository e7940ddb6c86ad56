"""Exact two-part DMS attention: a far part and a window band, merged by log-sum-exp (pure torch + flash ops).

DMS attention splits exactly by distance d = q - k of each (query, key) pair:
  far part:    d >= w + 1, every pair carries the per-key bias   -> causal attention between q[p >= w+1] and
               k[:sk - w - 1] (bottom-right aligned) with an additive per-key bias, no other mask;
  window band: 0 <= d <= w, no bias                               -> sliding-window causal attention.
Each part gives (out_i, lse_i); the result is sum_i exp(lse_i - lse) * out_i with lse = logaddexp(lse_1, lse_2).
Backward (as in ring attention): each part's flash backward, fed the merged output and merged LSE, yields that
part's share of the exact gradients (dS = P (dP - rowsum(dO * O)) with P the global probabilities).

Two implementations of the parts:
  "torch": chunks of ``chunk`` queries against only the keys they can see (O(L * chunk) memory; far part
           O(chunk * L), band O(chunk * (chunk + w))); any dtype and device. The CPU-testable statement.
  "flash": torch's flash-attention kernels (CUDA, bf16/fp16): the band through window_size_left = w; the far
           part with the bias carried as 8 extra head dims (hn + 8, e.g. 136) against a constant query dim.
Shapes as in ``attention.dense_dms_attention``: q [b, np, sq, hn], k/v [b, ng, sk, hn], key_logits [b, ng, sk].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from dms_megatron.core.masks import far_key_bias

EXTRA = 8            # extra head dims carrying the far bias in the flash far part (keeps hn + EXTRA % 8 == 0)
QX = 4.0             # the constant query value of the two used extra dims (keeps fp16 extra keys in range)
BIAS_FLOOR = -1e4    # flash far part: bias clamped here (exp(-1e4) == 0 in fp32; hard -inf becomes finite)


def _merge(o1, l1, o2, l2):
    """(out, lse) of attention over the union of two disjoint key sets. o [b, np, sq, hn], l [b, np, sq] fp32."""
    lse = torch.logaddexp(l1, l2)
    lse_safe = torch.where(torch.isinf(lse), 0.0, lse)
    w1 = torch.exp(l1 - lse_safe)[..., None]                                           # 0 where l1 = -inf
    w2 = torch.exp(l2 - lse_safe)[..., None]
    return (w1 * o1.float() + w2 * o2.float()).to(o1.dtype), lse


# ----------------------------------------------------------------------------------------------------- torch parts
def _chunk_scores(q, k, kbias, i0, i1, d_lo, d_hi, scale):
    """Scores of queries [i0, i1) against the keys j with d_lo <= p - j <= d_hi (p = query position), as
    [b, ng, g, C, nk] fp32 with -inf off the pairs, plus the first key index. q [b, np, sq, hn] -> grouped."""
    b, np_, sq, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    offset = sk - sq
    j0 = max(0, offset + i0 - d_hi)
    j1 = min(sk, offset + i1 - 1 - d_lo + 1)
    qc = q[:, :, i0:i1].float().view(b, ng, np_ // ng, i1 - i0, hn)                   # [b, ng, g, C, hn]
    kc = k[:, :, j0:max(j0, j1)].float()                                             # [b, ng, nk, hn]
    s = torch.einsum("bhgcd,bhkd->bhgck", qc, kc) * scale                             # [b, ng, g, C, nk]
    if kbias is not None:
        s = s + kbias[:, :, None, None, j0:max(j0, j1)]
    d = (offset + torch.arange(i0, i1, device=q.device))[:, None] - torch.arange(j0, max(j0, j1), device=q.device)
    return s.masked_fill(~((d >= d_lo) & (d <= d_hi)), float("-inf")), j0


def _torch_part_fwd(q, k, v, kbias, d_lo, d_hi, scale, chunk):
    """(out [b, np, sq, hn], lse [b, np, sq] fp32) of one part; rows without keys: out 0, lse -inf."""
    b, np_, sq, hn = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((b, np_, sq), float("-inf"), device=q.device)
    for i0 in range(0, sq, chunk):
        i1 = min(sq, i0 + chunk)
        s, j0 = _chunk_scores(q, k, kbias, i0, i1, d_lo, d_hi, scale)                 # [b, ng, g, C, nk]
        if s.shape[-1] == 0:
            continue
        m = s.logsumexp(-1)                                                            # [b, ng, g, C]
        p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
        vc = v[:, :, j0:j0 + s.shape[-1]].float()
        o = torch.einsum("bhgck,bhkd->bhgcd", p, vc)
        out[:, :, i0:i1] = o.reshape(b, np_, i1 - i0, hn).to(q.dtype)
        lse[:, :, i0:i1] = m.reshape(b, np_, i1 - i0)
    return out, lse


def _torch_part_bwd(dout, q, k, v, kbias, out, lse, d_lo, d_hi, scale, chunk):
    """Gradients of one part given the merged out / lse: (dq, dk, dv, dbias) fp32; dbias None without bias."""
    b, np_, sq, hn = q.shape
    ng = k.shape[1]
    g = np_ // ng
    dq = torch.zeros(q.shape, device=q.device)
    dk = torch.zeros(k.shape, device=q.device)
    dv = torch.zeros(v.shape, device=q.device)
    dbias = None if kbias is None else torch.zeros(kbias.shape, device=q.device)
    delta = (dout.float() * out.float()).sum(-1)                                       # [b, np, sq]
    for i0 in range(0, sq, chunk):
        i1 = min(sq, i0 + chunk)
        s, j0 = _chunk_scores(q, k, kbias, i0, i1, d_lo, d_hi, scale)                 # [b, ng, g, C, nk]
        j1 = j0 + s.shape[-1]
        if j1 == j0:
            continue
        grp = lambda t: t[:, :, i0:i1].reshape(b, ng, g, i1 - i0, *t.shape[3:])       # noqa: E731
        p = torch.exp(s - grp(lse)[..., None])                                         # global probabilities
        do = grp(dout).float()                                                         # [b, ng, g, C, hn]
        dv[:, :, j0:j1] += torch.einsum("bhgck,bhgcd->bhkd", p, do)
        dp = torch.einsum("bhgcd,bhkd->bhgck", do, v[:, :, j0:j1].float())
        ds = p * (dp - grp(delta)[..., None])                                          # d(score)
        dq[:, :, i0:i1] = torch.einsum("bhgck,bhkd->bhgcd", ds, k[:, :, j0:j1].float()).reshape(
            b, np_, i1 - i0, hn) * scale
        dk[:, :, j0:j1] += torch.einsum("bhgck,bhgcd->bhkd", ds, grp(q).float()) * scale
        if dbias is not None:
            dbias[:, :, j0:j1] += ds.sum((2, 3))
    return dq, dk, dv, dbias


class TorchParts:
    """The two parts in chunked torch (any device and dtype; fp32 math)."""

    def __init__(self, chunk: int = 256):
        self.chunk = chunk

    def forward(self, q, k, v, kbias, w, scale):
        far = _torch_part_fwd(q, k, v, kbias, w + 1, math.inf, scale, self.chunk)
        band = _torch_part_fwd(q, k, v, None, 0, w, scale, self.chunk)
        return far, band

    def backward(self, dout, q, k, v, kbias, out, lse, w, scale):
        far = _torch_part_bwd(dout, q, k, v, kbias, out, lse, w + 1, math.inf, scale, self.chunk)
        band = _torch_part_bwd(dout, q, k, v, None, out, lse, 0, w, scale, self.chunk)
        return far, band


# ----------------------------------------------------------------------------------------------------- flash parts
def _bshd(t):
    """[b, h, s, d] -> the flash layout [b, s, h, d] (a view)."""
    return t.transpose(1, 2)


class FlashParts:
    """The two parts on torch's flash-attention kernels (CUDA, bf16 / fp16; torch's private flash ops)."""

    @staticmethod
    def _far_inputs(q, k, v, kbias, w, scale):
        """Far queries/keys with the bias as extra head dims: q' [b, np, nq, hn + 8], k'/v' [b, ng, nf, hn + 8]."""
        sq, sk = q.shape[2], k.shape[2]
        i0 = max(0, w + 1 - (sk - sq))                                                 # first query with far keys
        nf = sk - w - 1                                                                # keys some query sees far
        e = (kbias[:, :, :nf].float().clamp_min(BIAS_FLOOR) / (scale * QX))            # [b, ng, nf]
        hi = e.to(q.dtype)
        lo = (e - hi.float()).to(q.dtype)                                              # hi + lo ~ e to 2^-16
        kx = torch.zeros(*e.shape, EXTRA, dtype=q.dtype, device=q.device)
        kx[..., 0], kx[..., 1] = hi, lo
        qx = torch.zeros(*q.shape[:2], sq - i0, EXTRA, dtype=q.dtype, device=q.device)
        qx[..., :2] = QX
        q_ = torch.cat([q[:, :, i0:], qx], -1)
        k_ = torch.cat([k[:, :, :nf], kx], -1)
        v_ = F.pad(v[:, :, :nf], (0, EXTRA))
        return i0, q_, k_, v_

    @staticmethod
    def _call(q, k, v, scale, window):
        """Causal (bottom-right) flash attention, optionally a window of ``window`` keys back. -> out, lse, state."""
        wl = {} if window is None else dict(window_size_left=window, window_size_right=0)
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            _bshd(q), _bshd(k), _bshd(v), None, None, q.shape[2], k.shape[2], 0.0, True, False, scale=scale, **wl)
        return _bshd(out), lse, (rng, unused)

    @staticmethod
    def _grad(dout, q, k, v, out, lse, state, scale, window):
        wl = {} if window is None else dict(window_size_left=window, window_size_right=0)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            _bshd(dout), _bshd(q), _bshd(k), _bshd(v), _bshd(out), lse.contiguous(), None, None, q.shape[2],
            k.shape[2], 0.0, True, state[0], state[1], scale=scale, **wl)
        return _bshd(dq), _bshd(dk), _bshd(dv)

    def forward(self, q, k, v, kbias, w, scale):
        b, np_, sq, hn = q.shape
        band_out, band_lse, self.band_state = self._call(q, k, v, scale, w)
        far_out = torch.zeros_like(q)
        far_lse = torch.full((b, np_, sq), float("-inf"), device=q.device)
        self.far_state = None
        if k.shape[2] - w - 1 > 0 and kbias is not None:
            i0, q_, k_, v_ = self._far_inputs(q, k, v, kbias, w, scale)
            o, lse, self.far_state = self._call(q_, k_, v_, scale, None)
            far_out[:, :, i0:], far_lse[:, :, i0:] = o[..., :hn], lse
        return (far_out, far_lse), (band_out, band_lse)

    def backward(self, dout, q, k, v, kbias, out, lse, w, scale):
        hn = q.shape[-1]
        band = self._grad(dout, q, k, v, out, lse, self.band_state, scale, w) + (None,)
        if self.far_state is None:
            return None, band
        i0, q_, k_, v_ = self._far_inputs(q, k, v, kbias, w, scale)
        nf = k_.shape[2]
        pad = lambda t: F.pad(t[:, :, i0:], (0, EXTRA))                                # noqa: E731
        dq_, dk_, dv_ = self._grad(pad(dout), q_, k_, v_, pad(out), lse[:, :, i0:], self.far_state, scale, None)
        dq = torch.zeros_like(q)
        dq[:, :, i0:] = dq_[..., :hn]
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dk[:, :, :nf], dv[:, :, :nf] = dk_[..., :hn], dv_[..., :hn]
        dbias = torch.zeros(kbias.shape, device=q.device)
        dbias[:, :, :nf] = dk_[..., hn].float() / (scale * QX)                         # d(score) summed over q
        dbias[:, :, :nf] *= (kbias[:, :, :nf] > BIAS_FLOOR)                            # the clamp's gradient
        return (dq, dk, dv, dbias), band


# ---------------------------------------------------------------------------------------------------- the merge
class _TwoPart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kbias, window: int, scale: float, parts):
        (far_out, far_lse), (band_out, band_lse) = parts.forward(q, k, v, kbias, window, scale)
        out, lse = _merge(far_out, far_lse, band_out, band_lse)                        # [b, np, sq, hn], [b, np, sq]
        ctx.save_for_backward(q, k, v, kbias, out, lse)
        ctx.meta = (window, scale, parts)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kbias, out, lse = ctx.saved_tensors
        window, scale, parts = ctx.meta
        far, band = parts.backward(dout.contiguous(), q, k, v, kbias, out, lse, window, scale)
        grads = [g.float() for g in band[:3]]
        if far is not None:
            grads = [a + b_.float() for a, b_ in zip(grads, far[:3])]
        dq, dk, dv = (g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
        dbias = None
        if ctx.needs_input_grad[3]:                                                    # zero without a far part
            dbias = far[3] if far is not None else torch.zeros(kbias.shape, device=kbias.device)
        return dq, dk, dv, dbias, None, None, None


def two_part_dms_attention_parts(query, key, value, key_logits, window, softmax_scale=None, hard=False,
                                 parts: str = "torch", chunk: int = 256) -> torch.Tensor:
    """``two_part_dms_attention`` with an explicit implementation of the parts ("torch" or "flash")."""
    b, np_, sq, hn = query.shape
    sk = key.shape[2]
    if sq > sk or window < 0 or np_ % key.shape[1]:
        raise ValueError(f"two_part_dms_attention: need sq <= sk, window >= 0, np % ng == 0 "
                         f"(got sq={sq} sk={sk} window={window} np={np_} ng={key.shape[1]})")
    if parts == "flash" and (not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError("two_part_dms_attention: the flash parts need CUDA bf16/fp16 tensors; use parts='torch' "
                         "or the 'dense' / 'triton' backend")
    impl = {"torch": lambda: TorchParts(chunk), "flash": FlashParts}[parts]()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hn)
    if key_logits is None:
        kbias, window = None, sk                                                       # no far part
    else:
        kbias = far_key_bias(key_logits, hard)                                         # [b, ng, sk] fp32
    return _TwoPart.apply(query, key, value, kbias, min(int(window), sk), float(scale), impl)


def two_part_dms_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           key_logits: Optional[torch.Tensor], window: int, softmax_scale: Optional[float] = None,
                           hard: bool = False) -> torch.Tensor:
    """Exact DMS attention as far part + window band (see the module docstring): flash kernels on CUDA (bf16 /
    fp16 only: other CUDA dtypes raise), chunked torch elsewhere. Same contract as ``dense_dms_attention``."""
    parts = "flash" if query.is_cuda else "torch"
    return two_part_dms_attention_parts(query, key, value, key_logits, window, softmax_scale, hard, parts=parts)


__all__ = ["FlashParts", "TorchParts", "two_part_dms_attention", "two_part_dms_attention_parts"]

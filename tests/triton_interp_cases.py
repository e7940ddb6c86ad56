"""The Triton DMS kernel on CPU through Triton's interpreter, against independent references.

Run through tests/test_triton_dms.py (it starts a fresh process with TRITON_INTERPRET=1, which triton reads at
its own import), or directly:

  TRITON_INTERPRET=1 python -m pytest tests/triton_interp_cases.py

Forward against the per-query loop (attention_inputs.loop_attention) and against the dense kernel; gradients w.r.t. q, k,
v and the eviction logits against a differentiable per-query loop (written here, independent of masks.py) and
against the dense kernel. Tiny sizes with 16-wide tiles so every tile mode (FAR, PLAIN, MIXED, ragged) occurs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start: run tests/test_triton_dms.py",
                allow_module_level=True)
pytest.importorskip("triton", reason="the Triton kernel tests need triton (pip install triton)")

from attention_inputs import loop_attention  # noqa: E402

from dms_megatron.core.dense_dms import dense_dms_attention  # noqa: E402
from dms_megatron.core.triton_dms import Blocks, triton_dms_attention_blocks  # noqa: E402
from attention_inputs import random_qkvz  # noqa: E402

SMALL = Blocks(fwd_m=16, fwd_n=16, bwd_m=16, bwd_n=16)


def _interpreter_problem() -> str:
    """'' if Triton's interpreter runs a loop with a runtime bound here, else why not (triton 3.6's interpreter
    cannot index with numpy >= 2.4; triton >= 3.7.0 can)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(X, n, B: tl.constexpr):
        for i in range(0, n, B):
            tl.store(X + i, 1.0)

    x = torch.zeros(8)
    try:
        _probe[(1,)](x, 8, B=4)
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        return f"triton {triton.__version__}'s interpreter fails here ({type(e).__name__}): use triton>=3.7.0 or numpy<2.4"
    return "" if x.tolist() == [1, 0, 0, 0, 1, 0, 0, 0] else "Triton's interpreter gave a wrong probe result"


_PROBLEM = _interpreter_problem()
if _PROBLEM:
    pytest.skip(_PROBLEM, allow_module_level=True)


def _inputs(b, np_, ng, sq, sk, hn=16, seed=0):
    return random_qkvz(b, np_, ng, sq, sk, hn, seed)


def _loop_autograd(q, k, v, z, window, hard):
    """Differentiable per-query reference in float64: visible keys and the far bias chosen with Python ints."""
    b, np_, sq, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(np_ // ng, dim=1)                                      # [b, np, sk, hn]
    vv = v.repeat_interleave(np_ // ng, dim=1)
    zz = None if z is None else z.repeat_interleave(np_ // ng, dim=1)              # [b, np, sk]
    rows = []
    for i in range(sq):
        pos = sk - sq + i
        s = torch.einsum("bhd,bhkd->bhk", q[:, :, i], kk[:, :, :pos + 1]) / math.sqrt(hn)   # [b, np, pos+1]
        if zz is not None and pos - window > 0:
            far = zz[:, :, :pos - window]                                           # keys k < pos - window
            fb = torch.where(far > 0, -math.inf, 0.0) if hard else -torch.nn.functional.softplus(far)
            s = torch.cat([s[..., :pos - window] + fb, s[..., pos - window:]], dim=-1)
        rows.append(torch.einsum("bhk,bhkd->bhd", torch.softmax(s, -1), vv[:, :, :pos + 1]))
    return torch.stack(rows, dim=2)


def _grads(fn, q, k, v, z, go):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    zl = None if z is None else z.clone().requires_grad_(True)
    out = fn(*leaves, zl)
    out.backward(go)
    return out.detach(), [t.grad for t in leaves] + ([] if zl is None else [zl.grad])


# (b, np, ng, sq, sk, window): tile modes with 16-wide tiles noted
CASES = [
    (2, 4, 4, 37, 37, 5),    # MHA, batch 2, ragged L, FAR + MIXED
    (1, 4, 2, 80, 80, 40),   # GQA 2, FAR, MIXED and PLAIN tiles, L a multiple of the tile
    (1, 4, 1, 53, 53, 3),    # GQA 4 (MQA), ragged
    (1, 4, 2, 21, 45, 7),    # sq < sk: the last 21 of 45 positions
    (1, 2, 1, 37, 37, 0),    # window 0: only the diagonal is in the band
    (1, 2, 1, 37, 37, 100),  # window > L: no bias anywhere (z gets zero gradient)
]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("b,np_,ng,sq,sk,w", CASES)
def test_forward_and_gradients_match_loops_and_dense(b, np_, ng, sq, sk, w, hard):
    q, k, v, z = _inputs(b, np_, ng, sq, sk)
    go = torch.randn(b, np_, sq, q.shape[-1], generator=torch.Generator().manual_seed(1))
    out, grads = _grads(lambda *a: triton_dms_attention_blocks(*a, w, hard=hard, blocks=SMALL), q, k, v, z, go)

    loop = loop_attention(q.double(), k.double(), v.double(), z.double(), w, hard)
    assert (out.double() - loop).abs().max() <= 1e-4

    f64 = [t.double() for t in (q, k, v, z)]
    ref_out, ref_grads = _grads(lambda *a: _loop_autograd(*a, w, hard), *f64, go.double())
    dense_out, dense_grads = _grads(lambda *a: dense_dms_attention(*a, w, hard=hard), q, k, v, z, go)
    assert (out.double() - ref_out).abs().max() <= 1e-4
    assert (out - dense_out).abs().max() <= 1e-4
    for name, g, r, d in zip("qkvz", grads, ref_grads, dense_grads):
        if hard and name == "z":                                                    # hard: z has no gradient
            assert g is None and r is None
            continue
        r = torch.zeros_like(g, dtype=torch.float64) if r is None else r            # window > L: z unused
        assert torch.isfinite(g).all(), name
        assert (g.double() - r).abs().max() <= 1e-4, name
        if d is not None:
            assert (g - d).abs().max() <= 1e-4, name


# Tile-boundary sweep: (window, offset = sk - sq) pairs whose window, offset and offset - window cover every
# residue mod the 16-wide tiles; windows of 2-3 tiles so that FAR, MIXED and PLAIN tiles all occur (sq = 64):
# every segment bound of the three kernels lands on a tile edge somewhere (an off-by-one in any bound fails).
SWEEP = [(32 + w, off) for w, off in [(13, 7), (8, 4), (9, 10), (15, 12), (14, 6), (2, 0), (11, 15), (6, 9),
                                      (1, 3), (0, 11), (5, 14), (12, 2), (3, 8), (10, 1), (4, 4), (7, 6), (9, 13),
                                      (13, 5)]]


@pytest.mark.parametrize("w,offset", SWEEP)
def test_tile_boundary_sweep_against_dense(w, offset):
    q, k, v, z = _inputs(1, 2, 1, 64, 64 + offset, seed=w)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(offset))
    out, grads = _grads(lambda *a: triton_dms_attention_blocks(*a, w, blocks=SMALL), q, k, v, z, go)
    ref_out, ref_grads = _grads(lambda *a: dense_dms_attention(*a, w), *(t.double() for t in (q, k, v, z)),
                                go.double())
    assert (out.double() - ref_out).abs().max() <= 1e-4
    for name, g, r in zip("qkvz", grads, ref_grads):
        assert (g.double() - r).abs().max() <= 1e-4, name


@pytest.mark.parametrize("ng,sq,sk", [(2, 37, 37), (1, 10, 29)])
def test_plain_causal_without_key_logits(ng, sq, sk):
    q, k, v, _ = _inputs(1, 4, ng, sq, sk)
    go = torch.randn(1, 4, sq, q.shape[-1], generator=torch.Generator().manual_seed(2))
    out, grads = _grads(lambda q_, k_, v_, _z: triton_dms_attention_blocks(q_, k_, v_, None, 3, blocks=SMALL),
                        q, k, v, None, go)
    ref_out, ref_grads = _grads(lambda q_, k_, v_, _z: _loop_autograd(q_, k_, v_, None, 3, False),
                                q.double(), k.double(), v.double(), None, go.double())
    assert (out.double() - ref_out).abs().max() <= 1e-4
    for name, g, r in zip("qkv", grads, ref_grads):
        assert (g.double() - r).abs().max() <= 1e-4, name


def test_unequal_tiles_and_wider_heads():
    """Forward tiles 16 x 32, backward 32 x 16, head dim 32; non-contiguous q (a transposed view)."""
    q, k, v, z = _inputs(1, 4, 2, 50, 50, hn=32)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)                              # same values, other strides
    blocks = Blocks(fwd_m=16, fwd_n=32, bwd_m=16, bwd_n=32)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    out, grads = _grads(lambda *a: triton_dms_attention_blocks(*a, 9, blocks=blocks), q, k, v, z, go)
    ref_out, ref_grads = _grads(lambda *a: _loop_autograd(*a, 9, False), *(t.double() for t in (q, k, v, z)),
                                go.double())
    assert (out.double() - ref_out).abs().max() <= 1e-4
    for name, g, r in zip("qkvz", grads, ref_grads):
        assert (g.double() - r).abs().max() <= 1e-4, name


def _autotune_tiles():
    """Blocks covering every tile shape the CUDA autotuner may pick (triton_dms.AUTOTUNE): the forward / dQ
    (queries x keys) shapes zipped cyclically with the dK/dV (keys x queries) shapes."""
    from dms_megatron.core.triton_dms import AUTOTUNE

    fwd = sorted({c[:2] for name in ("dms_fwd", "dms_bwd_dq") for c in AUTOTUNE[name]})
    bwd = sorted({c[:2] for c in AUTOTUNE["dms_bwd_dkdv"]})
    n = max(len(fwd), len(bwd))
    return [Blocks(fwd_m=fwd[i % len(fwd)][0], fwd_n=fwd[i % len(fwd)][1], bwd_n=bwd[i % len(bwd)][0],
                   bwd_m=bwd[i % len(bwd)][1]) for i in range(n)]


@pytest.mark.parametrize("window", [40, 200])
@pytest.mark.parametrize("blocks", _autotune_tiles(), ids=lambda b: f"f{b.fwd_m}x{b.fwd_n}-b{b.bwd_n}x{b.bwd_m}")
def test_the_autotuned_tile_shapes(blocks, window):
    """The CUDA autotuner picks each kernel's tiles on its own, so every candidate shape must be exact: forward and
    gradients against the per-query loop, L = 300 (ragged against every tile), windows below and above the tiles."""
    q, k, v, z = _inputs(1, 4, 2, 300, 300, hn=16)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    out, grads = _grads(lambda *a: triton_dms_attention_blocks(*a, window, blocks=blocks), q, k, v, z, go)
    ref_out, ref_grads = _grads(lambda *a: _loop_autograd(*a, window, False), *(t.double() for t in (q, k, v, z)),
                                go.double())
    assert (out.double() - ref_out).abs().max() <= 1e-4
    for name, g, r in zip("qkvz", grads, ref_grads):
        assert (g.double() - r).abs().max() <= 1e-4, name


def test_fp16_forward_and_gradients_are_close():
    """Half precision (fp16: the interpreter's tl.dot mishandles bf16, which the CUDA tests cover)."""
    q, k, v, z = _inputs(1, 4, 2, 40, 40)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    half = [t.half() for t in (q, k, v)]
    out, grads = _grads(lambda *a: triton_dms_attention_blocks(*a, 6, blocks=SMALL), *half, z, go.half())
    ref_out, ref_grads = _grads(lambda *a: _loop_autograd(*a, 6, False), *(t.double() for t in (*half, z)),
                                go.half().double())
    assert out.dtype == torch.float16 and (out.double() - ref_out).abs().max() <= 2e-3
    for name, g, r in zip("qkvz", grads, ref_grads):
        assert g.dtype == (torch.float32 if name == "z" else torch.float16), name
        assert (g.double() - r).abs().max() <= 2e-3 * max(1.0, r.abs().max().item()), name


@pytest.mark.parametrize("bad,match", [
    (dict(hn=24), "power of two"),
    (dict(sq=50, sk=40), "sq <= sk"),
    (dict(window=-1), "window >= 0"),
])
def test_errors_name_the_fix(bad, match):
    hn, sq, sk, w = bad.get("hn", 16), bad.get("sq", 20), bad.get("sk", 20), bad.get("window", 3)
    q = torch.randn(1, 2, sq, hn)
    k = torch.randn(1, 1, sk, hn)
    with pytest.raises(ValueError, match=match):
        triton_dms_attention_blocks(q, k, k, None, w, blocks=SMALL)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_dms_attention_blocks(q, q, q, None, 3)

"""CUDA checks of the DMS kernels against the dense reference (skipped without CUDA).

  python -m pytest -m gpu tests/test_gpu_kernels.py tests/test_flex_compile.py -q      # ~2-4 min on an H200

Triton kernel (compiled): fp32 to 1e-4 (forward and gradients w.r.t. q, k, v, z; soft and hard; GQA; ragged
L; sq < sk), bf16 at L = 4096 loosely, extra peak memory linear in L. The two-part split on flash kernels
(bf16). Compiled flex with bucketed lengths on CUDA (forward and gradients).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dms_megatron.core.dense_dms import dense_dms_attention
from dms_megatron.core.flex_dms import flex_dms_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _inputs(b, np_, ng, sq, sk, hn, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    q, k, v = mk(b, np_, sq, hn), mk(b, ng, sk, hn), mk(b, ng, sk, hn)
    z = torch.randn(b, ng, sk, generator=g, device="cuda") * 3
    z[..., -1] = -float("inf")
    return q, k, v, z


def _fwd_bwd(fn, q, k, v, z, go):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    zl = z.detach().clone().requires_grad_(True)
    out = fn(*leaves, zl)
    out.backward(go)
    return out.detach(), [t.grad for t in leaves] + [zl.grad]


def _compare(fn, q, k, v, z, w, hard, out_tol, grad_tol):
    """fn against dense_dms_attention in fp32 on the same (rounded) inputs; grad_tol relative to max |grad|."""
    go = torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7)).to(q.dtype)
    out, grads = _fwd_bwd(fn, q, k, v, z, go)
    ref, ref_grads = _fwd_bwd(lambda *a: dense_dms_attention(*a, w, hard=hard), q.float(), k.float(), v.float(),
                              z, go.float())
    assert (out.float() - ref).abs().max() <= out_tol
    for name, g, r in zip("qkvz", grads, ref_grads):
        if hard and name == "z":
            assert g is None or g.abs().max() == 0
            continue
        assert torch.isfinite(g).all(), name
        assert (g.float() - r).abs().max() <= grad_tol * max(1.0, r.abs().max().item()), name


@needs_triton
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("np_,ng,sq,sk,hn,w", [
    (4, 2, 300, 300, 64, 16),      # ragged L, GQA 2
    (8, 2, 1000, 1000, 128, 256),  # GQA 4, several FAR / PLAIN / MIXED tiles
    (4, 4, 77, 600, 128, 100),     # sq < sk, MHA
    (4, 1, 200, 200, 64, 500),     # window > L
])
def test_triton_fp32_matches_dense(np_, ng, sq, sk, hn, w, hard):
    from dms_megatron.core.triton_dms import Blocks, triton_dms_attention_blocks

    q, k, v, z = _inputs(1, np_, ng, sq, sk, hn, torch.float32)
    blocks = Blocks(64, 64, 64, 64, num_warps=4, num_stages=2)                         # one config: few compiles
    _compare(lambda *a: triton_dms_attention_blocks(*a, w, hard=hard, blocks=blocks), q, k, v, z, w, hard,
             1e-4, 1e-4)


@needs_triton
def test_triton_plain_causal_fp32():
    from dms_megatron.core.triton_dms import Blocks, triton_dms_attention_blocks

    q, k, v, _ = _inputs(2, 4, 2, 333, 333, 64, torch.float32)
    out = triton_dms_attention_blocks(q, k, v, None, 16, blocks=Blocks(64, 64, 64, 64))
    assert (out - dense_dms_attention(q, k, v, None, 16)).abs().max() <= 1e-4


@needs_triton
@pytest.mark.parametrize("hard", [False, True])
def test_triton_bf16_at_4096(hard):
    """The public, autotuned function (as benchmarks/gpu.py runs it)."""
    from dms_megatron.core.triton_dms import triton_dms_attention

    q, k, v, z = _inputs(1, 8, 2, 4096, 4096, 128, torch.bfloat16)
    _compare(lambda *a: triton_dms_attention(*a, 256, hard=hard), q, k, v, z, 256, hard, 2e-2, 3e-2)


@needs_triton
def test_triton_extra_memory_is_linear_in_length():
    """Extra peak of fwd+bwd (bf16, 8 heads, hn 128) at L and 2L: about 2x (O(L)), far below one L x L matrix."""
    from dms_megatron.core.triton_dms import triton_dms_attention

    extra = {}
    for L in (4096, 8192):
        q, k, v, z = (t.requires_grad_(True) for t in _inputs(1, 8, 2, L, L, 128, torch.bfloat16))
        triton_dms_attention(q, k, v, z, 256).sum().backward()                        # compile / autotune first
        for t in (q, k, v, z):
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        triton_dms_attention(q, k, v, z, 256).sum().backward()
        torch.cuda.synchronize()
        extra[L] = torch.cuda.max_memory_allocated() - base
        assert extra[L] < 8 * L * L * 2 / 8                                            # < 1/8 of one [8, L, L] bf16
    assert extra[8192] <= 2.5 * extra[4096]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("sq,sk,w", [(2048, 2048, 256), (1000, 1000, 7), (300, 1200, 100)])
def test_two_part_flash_bf16_matches_dense(sq, sk, w, hard):
    from dms_megatron.core.two_part import two_part_dms_attention

    q, k, v, z = _inputs(1, 8, 2, sq, sk, 128, torch.bfloat16)
    _compare(lambda *a: two_part_dms_attention(*a, w, hard=hard), q, k, v, z, w, hard, 2e-2, 3e-2)


def test_flex_compiled_bucketed_fp32_matches_dense():
    """Two lengths in one bucket (one graph), padded and cut; gradients through the compiled flex."""
    for sq, sk in ((300, 300), (257, 380)):
        q, k, v, z = _inputs(1, 4, 2, sq, sk, 64, torch.float32)
        _compare(lambda *a: flex_dms_attention(*a, 16, compiled=True), q, k, v, z, 16, False, 1e-5, 1e-4)

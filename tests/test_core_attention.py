"""DMS attention kernels against an independent per-head, per-query loop; flex == dense."""

import pytest
import torch

from attention_inputs import loop_attention, random_qkvz

from dms_megatron.core.dense_dms import dense_dms_attention
from dms_megatron.core.flex_dms import flex_dms_attention

B, NP, HN, W = 2, 4, 8, 3


def _inputs(ng, sq, sk, seed=0, dtype=torch.float64):
    return random_qkvz(B, NP, ng, sq, sk, HN, seed, dtype)


@pytest.mark.parametrize("ng", [1, 2, 4])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("sq,sk", [(10, 10), (4, 10)])
def test_dense_matches_loop(ng, hard, sq, sk):
    q, k, v, z = _inputs(ng, sq, sk)
    ref = loop_attention(q, k, v, z, W, hard)
    got = dense_dms_attention(q, k, v, z, W, hard=hard)
    assert torch.allclose(got, ref, atol=1e-10)


def test_dense_without_logits_is_causal_attention():
    q, k, v, _ = _inputs(2, 7, 7)
    assert torch.allclose(dense_dms_attention(q, k, v, None, W), loop_attention(q, k, v, None, W, False), atol=1e-10)


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


# ---- the kernel registry: a typed contract, lazy imports, "auto" resolved once at build ----------------------------

KERNEL_MODULES = ("dms_megatron.core.dense_dms", "dms_megatron.core.flex_dms", "dms_megatron.core.triton_dms",
                  "dms_megatron.core.two_part")


def test_every_registered_kernel_follows_the_contract():
    import inspect

    from dms_megatron.core.attention import KERNEL_PARAMS, KERNELS, load_kernel

    assert set(KERNELS) == {"dense", "flex", "triton", "two_part"}
    for name in KERNELS:
        params = list(inspect.signature(load_kernel(name)).parameters)
        assert tuple(params[:7]) == ("query", "key", "value", "key_logits", "window", "softmax_scale", "hard") == \
            KERNEL_PARAMS, name


def test_a_kernel_off_the_contract_is_refused(monkeypatch):
    import sys
    import types

    from dms_megatron.core import attention

    mod = types.ModuleType("fake_kernels")
    mod.swapped = lambda query, key, value, window, key_logits, softmax_scale=None, hard=False: query  # order
    mod.required_extra = lambda query, key, value, key_logits, window, softmax_scale=None, hard=False, blocks=1, \
        tile=None: query  # noqa: E731
    mod.needs_more = lambda query, key, value, key_logits, window, softmax_scale=None, hard=False, *, blocks: query
    monkeypatch.setitem(sys.modules, "fake_kernels", mod)
    for attr in ("swapped", "needs_more"):
        monkeypatch.setitem(attention.KERNELS, attr, f"fake_kernels:{attr}")
        with pytest.raises(TypeError, match=f"DMS kernel '{attr}'.*does not follow the DMSKernel contract"):
            attention.load_kernel(attr)
    monkeypatch.setitem(attention.KERNELS, "required_extra", "fake_kernels:required_extra")
    monkeypatch.setattr(attention, "_LOADED", {})
    assert attention.load_kernel("required_extra") is mod.required_extra  # extra parameters with defaults are fine


def test_validating_a_config_imports_no_kernel():
    import subprocess
    import sys

    code = ("import sys; from dms_megatron.config import TINY_TEACHER, DMSConfig, RefitConfig; "
            "from dms_megatron.core.attention import resolve_backend_name; "
            "DMSConfig(backend='triton'); RefitConfig(TINY_TEACHER); resolve_backend_name('auto', 'cuda'); "
            f"print([m for m in {KERNEL_MODULES!r} + ('triton', 'torch.nn.attention.flex_attention') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_auto_backend_is_resolved_once_when_the_model_is_built(megatron_single, monkeypatch):
    from conftest import tiny_model_config

    from dms_megatron.config import DMSConfig
    from dms_megatron.core import attention
    from dms_megatron.megatron import attention as megatron_attention
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    model = build_gpt_model(tiny_model_config(), DMSConfig(window=2, backend="auto"), seq_length=8)
    cores = [m for m in model.modules() if isinstance(m, megatron_attention.DMSCoreAttention)]
    assert cores and all(c.kernel_name == "dense" and c.kernel is attention.load_kernel("dense") for c in cores)

    def no_resolving(*a, **k):
        raise AssertionError("the backend was resolved again during a forward")

    monkeypatch.setattr(megatron_attention, "resolve_backend_name", no_resolving)
    monkeypatch.setattr(attention, "resolve_backend_name", no_resolving)
    tokens = torch.randint(0, 64, (1, 8))
    with dms_forward(model, DMSRuntime(mode="hard")):
        out = model(tokens, torch.arange(8)[None], None)
    assert out.shape[:2] == (1, 8)
    cores[0].kernel_device = "cuda"  # built for another device than the one it runs on: one clear error
    with pytest.raises(RuntimeError, match="was built for cuda .*runs on cpu"):
        with dms_forward(model, DMSRuntime(mode="hard")):
            model(tokens, torch.arange(8)[None], None)

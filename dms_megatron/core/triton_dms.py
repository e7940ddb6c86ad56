"""Flash-style DMS attention in Triton: O(L) extra memory, fwd + bwd, differentiable w.r.t. q, k, v and the
eviction logits (soft mode). Same signature and math as ``attention.dense_dms_attention``.

  q, k, v: [b, np, sq, hn], [b, ng, sk, hn], [b, ng, sk, hn] (bf16 / fp16 / fp32; hn a power of two, 16..256)
  key_logits: [b, ng, sk] or None (plain causal). Output [b, np, sq, hn].

The per-key far bias (soft: logsigmoid(-z), hard: 0 / -inf where z > 0) is computed here in torch, so autograd
turns the kernel's d(bias) into d(key_logits). The kernels live in ``_triton_dms_kernels`` and are loaded on the
first call (triton is an optional dependency: ``pip install triton``). On CUDA the tile sizes are autotuned per
(sq, sk, head dim, dtype); on CPU tensors the kernels run in Triton's interpreter, which must be asked for:

  TRITON_INTERPRET=1 python -m pytest tests/test_triton_dms.py      # CPU, tiny sizes (the test sets it itself)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from dms_megatron.core.masks import far_key_bias

NO_WINDOW = 2 ** 30  # "window" passed to the kernels when no bias applies (keeps int32 segment arithmetic safe)


@dataclass(frozen=True)
class Blocks:
    """Explicit tile sizes (tests, the CPU interpreter); ``None`` instead of a Blocks -> autotuned on CUDA.
    fwd_m x fwd_n: forward and dQ tiles (queries x keys); bwd_n x bwd_m: dK/dV tiles (keys x queries)."""
    fwd_m: int = 64
    fwd_n: int = 64
    bwd_m: int = 64
    bwd_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


_KERNELS: list = []


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """The kernels module, loaded on first use. Triton decides at its own import whether it interprets (its
    library functions are decorated then), so TRITON_INTERPRET must not change after triton is imported."""
    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton_dms_attention needs triton: pip install triton (3.6 tested on CUDA)")
    import triton.language as tl  # optional: triton is absent on most CPU machines (and imports slowly)
    from triton.runtime.interpreter import InterpretedFunction  # optional, as above

    if isinstance(tl.zeros, InterpretedFunction) != _interpreting():
        raise RuntimeError("TRITON_INTERPRET changed after triton was imported: set it in the environment of a "
                           "fresh process (before the first import of triton)")
    if not _KERNELS:
        mod = importlib.import_module("dms_megatron.core._triton_dms_kernels")
        if not _interpreting():
            _add_autotuned(mod)
        _KERNELS.append(mod)
    return _KERNELS[0]


# Autotune candidates on CUDA, per kernel: (row tile, column tile, num_warps, num_stages); the tiles are named
# in TILES. Chosen with `python -m dms_megatron.core.triton_aot` (sm_90a, bf16, 32/8 heads, head dim 128): none
# spills inside its tile loops; the forward and dQ candidates spill nothing. No pipelined dK/dV configuration is
# spill-free at head dim 128 (its 8-warp ones spill 16-384 bytes outside the tile loops, its 4-warp ones inside),
# so that list holds the two spill-free unpipelined configurations and five 8-warp pipelined ones; the autotuner
# times them.
AUTOTUNE = {
    "dms_fwd": ((128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)),
    "dms_bwd_dkdv": ((128, 32, 8, 1), (64, 32, 4, 1), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2),
                     (128, 16, 8, 2), (64, 32, 8, 2)),
    "dms_bwd_dq": ((128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)),
}
# kernel -> (row-tile constexpr, its Blocks field, column-tile constexpr, its Blocks field); the launch grid is
# (cdiv(rows, row tile), columns). dK/dV tiles hold keys on rows.
TILES = {"dms_fwd": ("BLOCK_M", "fwd_m", "BLOCK_N", "fwd_n"), "dms_bwd_dkdv": ("BLOCK_N", "bwd_n", "BLOCK_M", "bwd_m"),
         "dms_bwd_dq": ("BLOCK_M", "fwd_m", "BLOCK_N", "fwd_n")}
DELTA_ROWS = 64  # dms_bwd_delta's query tile when autotuning (it streams O and dO once: no tuning)
KEY = ["sq", "sk", "HEAD_DIM", "DOT_PREC"]


def _add_autotuned(mod) -> None:
    """Autotuned handles (CUDA) next to the raw kernels, from AUTOTUNE."""
    import triton  # optional: see _kernels

    for name, configs in AUTOTUNE.items():
        row_tile, _, col_tile, _ = TILES[name]
        cfgs = [triton.Config({row_tile: r, col_tile: c}, num_warps=w, num_stages=s) for r, c, w, s in configs]
        setattr(mod, name + "_tuned", triton.autotune(cfgs, key=KEY)(getattr(mod, name)))


def autotune_picks() -> dict:
    """What the autotuner chose so far in this process: {kernel: {"sq,sk,HEAD_DIM,DOT_PREC": [row tile, column
    tile, num_warps, num_stages]}}; {} before the kernels are loaded (benchmarks/gpu.py records it)."""
    if not _KERNELS or not hasattr(_KERNELS[0], "dms_fwd_tuned"):
        return {}
    picks = {}
    for name in AUTOTUNE:
        row_tile, _, col_tile, _ = TILES[name]
        cache = getattr(_KERNELS[0], name + "_tuned").cache
        picks[name] = {",".join(map(str, key[:len(KEY)])): [c.kwargs[row_tile], c.kwargs[col_tile], c.num_warps,
                                                             c.num_stages] for key, c in cache.items()}
    return picks


@dataclass
class KernelCall:
    """One kernel launch: its name, grid (cdiv(rows, row tile), cols), positional args and constexpr kwargs. Built
    by the same functions for the real launch and for the ahead-of-time compile (``triton_aot``)."""
    name: str
    rows: int
    cols: int
    args: tuple
    consts: dict


def _launch(mod, call: KernelCall, blocks: Optional[Blocks]) -> None:
    """Launch ``call``: autotuned when ``blocks`` is None and the kernel has candidates, else with ``blocks``."""
    import triton  # optional: see _kernels

    if call.name not in TILES:                                                      # fixed tiles in consts
        tile = call.consts["BLOCK_M"]
        getattr(mod, call.name)[(triton.cdiv(call.rows, tile), call.cols)](*call.args, **call.consts)
        return
    row_tile, row_field, col_tile, col_field = TILES[call.name]
    if blocks is None:
        getattr(mod, call.name + "_tuned")[lambda meta: (triton.cdiv(call.rows, meta[row_tile]), call.cols)](
            *call.args, **call.consts)
    else:
        rows = getattr(blocks, row_field)
        getattr(mod, call.name)[(triton.cdiv(call.rows, rows), call.cols)](
            *call.args, **call.consts, **{row_tile: rows, col_tile: getattr(blocks, col_field)},
            num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dim with stride 1 (any other strides are passed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def forward_call(q, k, v, kb, has_bias: bool, window: int, scale: float):
    """(the forward launch, out [b, np, sq, hn], lse [b, np, sq] fp32 in log2 units) for row-major q, k, v and
    the fp32 bias ``kb`` ([b, ng, sk], or a 1-element placeholder without bias)."""
    b, np_, sq, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, np_, sq, dtype=torch.float32, device=q.device)
    call = KernelCall("dms_fwd", sq, b * np_, (
        q, k, v, kb, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), kb.stride(0), kb.stride(1),
        np_, np_ // ng, sq, sk, window, scale * math.log2(math.e)),
        dict(HEAD_DIM=hn, HAS_BIAS=has_bias, DOT_PREC=_prec(q.dtype)))
    return call, out, lse


def backward_calls(q, k, v, kb, has_bias: bool, out, lse, dout, window: int, scale: float, bias_grad: bool,
                   delta_rows: int):
    """([delta, dK/dV, dQ launches], (dq, dk, dv, dkb or None)) for the forward's saved tensors and row-major dout."""
    b, np_, sq, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    delta = torch.empty(b, np_, sq, dtype=torch.float32, device=q.device)           # rowsum(dO * O)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)                        # contiguous
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dkb = torch.empty(b, ng, sk, dtype=torch.float32, device=q.device) if bias_grad else kb
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), kb.stride(0), kb.stride(1),
              np_, np_ // ng, sq, sk, window, scale, scale * math.log2(math.e))
    consts = dict(HEAD_DIM=hn, HAS_BIAS=has_bias, DOT_PREC=_prec(q.dtype))
    calls = [KernelCall("dms_bwd_delta", sq, b * np_, (out, dout, delta, *_strides(out), *_strides(dout), np_, sq),
                        dict(HEAD_DIM=hn, BLOCK_M=delta_rows)),
             KernelCall("dms_bwd_dkdv", sk, b * ng, (q, k, v, kb, dout, lse, delta, dk, dv, dkb, *common),
                        dict(consts, BIAS_GRAD=bias_grad)),
             KernelCall("dms_bwd_dq", sq, b * np_, (q, k, v, kb, dout, lse, delta, dq, *common), consts)]
    return calls, (dq, dk, dv, dkb if bias_grad else None)


class _TritonDMS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kbias, window: int, scale: float, blocks: Optional[Blocks]):
        # q [b, np, sq, hn]; k, v [b, ng, sk, hn]; kbias [b, ng, sk] fp32 or None
        mod = _kernels()
        q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
        has_bias = kbias is not None
        kb = kbias.contiguous() if has_bias else torch.zeros(1, 1, 1, dtype=torch.float32, device=q.device)
        call, out, lse = forward_call(q, k, v, kb, has_bias, window, scale)
        _launch(mod, call, blocks)
        ctx.save_for_backward(q, k, v, kb, out, lse)
        ctx.meta = (has_bias, window, scale, blocks)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kb, out, lse = ctx.saved_tensors
        has_bias, window, scale, blocks = ctx.meta
        mod = _kernels()
        bias_grad = has_bias and ctx.needs_input_grad[3]
        calls, (dq, dk, dv, dkb) = backward_calls(q, k, v, kb, has_bias, out, lse, _rowmajor(dout), window, scale,
                                                  bias_grad, DELTA_ROWS if blocks is None else blocks.fwd_m)
        for call in calls:
            _launch(mod, call, blocks)
        return dq, dk, dv, dkb, None, None, None


def _check(query, key, value, key_logits, window):
    b, np_, sq, hn = query.shape
    ng, sk = key.shape[1], key.shape[2]
    if key.shape != value.shape or key.shape[0] != b or key.shape[3] != hn or np_ % ng:
        raise ValueError(f"triton_dms_attention: shapes q {tuple(query.shape)} k {tuple(key.shape)} "
                         f"v {tuple(value.shape)}: need k == v [b, ng, sk, hn] with np % ng == 0")
    if len({query.dtype, key.dtype, value.dtype}) > 1 or len({query.device, key.device, value.device}) > 1:
        raise ValueError(f"triton_dms_attention: q, k, v must share dtype and device (got {query.dtype}/"
                         f"{key.dtype}/{value.dtype} on {query.device}/{key.device}/{value.device}): cast them")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"triton_dms_attention: dtype {query.dtype} unsupported: use bf16, fp16 or fp32")
    if sq > sk or window < 0:
        raise ValueError(f"triton_dms_attention: need sq <= sk and window >= 0 (got sq={sq} sk={sk} window={window})")
    if hn < 16 or hn > 256 or hn & (hn - 1):
        raise ValueError(f"triton_dms_attention: head dim {hn} must be a power of two in 16..256 (pad the heads)")
    if key_logits is not None and tuple(key_logits.shape) != (b, ng, sk):
        raise ValueError(f"triton_dms_attention: key_logits {tuple(key_logits.shape)} must be [b, ng, sk]")
    if not query.is_cuda and not _interpreting():
        raise RuntimeError("triton_dms_attention needs CUDA tensors (CPU runs only in Triton's interpreter: "
                           "set TRITON_INTERPRET=1, for tests)")


def triton_dms_attention_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                key_logits: Optional[torch.Tensor], window: int,
                                softmax_scale: Optional[float] = None, hard: bool = False,
                                blocks: Optional[Blocks] = None) -> torch.Tensor:
    """``triton_dms_attention`` with explicit tile sizes (``blocks``; None -> autotuned, CUDA only)."""
    _check(query, key, value, key_logits, window)
    if blocks is None and not query.is_cuda:
        blocks = Blocks()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(query.shape[-1])
    if key_logits is None:
        kbias, window = None, NO_WINDOW
    else:
        kbias = far_key_bias(key_logits, hard)                                       # [b, ng, sk] fp32
    return _TritonDMS.apply(query, key, value, kbias, min(int(window), NO_WINDOW), float(scale), blocks)


def triton_dms_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_logits: Optional[torch.Tensor], window: int, softmax_scale: Optional[float] = None,
                         hard: bool = False) -> torch.Tensor:
    """DMS attention with the Triton kernel (autotuned on CUDA). Same contract as ``dense_dms_attention``."""
    return triton_dms_attention_blocks(query, key, value, key_logits, window, softmax_scale, hard)


__all__ = ["AUTOTUNE", "Blocks", "autotune_picks", "KernelCall", "TILES", "backward_calls", "forward_call", "triton_dms_attention",
           "triton_dms_attention_blocks"]

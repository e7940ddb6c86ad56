"""The DMS attention kernel contract and its registry. Each kernel lives in its own module and is imported only
when it is chosen (validating a config or planning a run imports none of them):

  dense     ``core/dense_dms.py``   SDPA with a materialised additive bias: the reference, the CPU training path
  flex      ``core/flex_dms.py``    FlexAttention over an O(L) per-key bias (compiled per length bucket)
  triton    ``core/triton_dms.py``  flash-style Triton kernel (needs triton; CUDA, or Triton's CPU interpreter)
  two_part  ``core/two_part.py``    the exact split: window band + far part, merged by log-sum-exp

Every kernel is a ``DMSKernel``: it applies per-key eviction scores only to queries more than ``window`` positions
after the key (soft: bias log(1 - alpha_k) = logsigmoid(-z_k); hard: keys with z_k > 0 are invisible to them).
Shapes: query [b, np, sq, hn], key/value [b, ng, sk, hn] (GQA: query head h uses KV head h // (np // ng)),
key_logits [b, ng, sk] aligned to keys (``masks.decisions_to_key_logits``) or None for plain causal attention;
the sq queries are the last sq of the sk positions. Output [b, np, sq, hn].

``backend="auto"`` is resolved once, when a model is built, to ``AUTO_BACKEND`` of the device it is built for.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Dict, Optional, Protocol, Tuple

import torch


class DMSKernel(Protocol):
    """The kernel contract (called with keywords after the three tensors; see the module docstring)."""

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 key_logits: Optional[torch.Tensor], window: int, softmax_scale: Optional[float] = None,
                 hard: bool = False) -> torch.Tensor: ...


#: The contract's parameters, in order: a registered kernel must accept exactly these first (extra ones need
#: defaults), so that a call by keyword reaches every kernel alike.
KERNEL_PARAMS = ("query", "key", "value", "key_logits", "window", "softmax_scale", "hard")

#: name -> "module:function". The one list of kernels; nothing is imported until ``load_kernel``.
KERNELS: Dict[str, str] = {
    "dense": "dms_megatron.core.dense_dms:dense_dms_attention",
    "flex": "dms_megatron.core.flex_dms:flex_dms_attention",
    "triton": "dms_megatron.core.triton_dms:triton_dms_attention",
    "two_part": "dms_megatron.core.two_part:two_part_dms_attention",
}
BACKENDS: Tuple[str, ...] = tuple(KERNELS)
#: What ``backend="auto"`` means on each device: the fastest exact kernel there (Triton flash-style DMS kernel on
#: CUDA; the dense reference on CPU, where flex has no backward).
AUTO_BACKEND = {"cpu": "dense", "cuda": "triton"}

_LOADED: Dict[str, DMSKernel] = {}


def resolve_backend_name(name: str, device_type: str) -> str:
    """The kernel name a configured ``dms.backend`` means on ``device_type`` ("cpu" or "cuda"); imports nothing."""
    if name == "auto":
        if device_type not in AUTO_BACKEND:
            raise ValueError(f"dms.backend=auto has no kernel for device type {device_type!r}; choose one of "
                             f"{', '.join(BACKENDS)}")
        name = AUTO_BACKEND[device_type]
    if name not in KERNELS:
        raise ValueError(f"dms.backend={name!r} is unknown; allowed: auto, {', '.join(BACKENDS)}")
    return name


def check_kernel(name: str, fn) -> None:
    """TypeError unless ``fn``'s leading parameters are ``KERNEL_PARAMS`` and any further ones have defaults."""
    params = list(inspect.signature(fn).parameters.values())
    names = tuple(p.name for p in params[:len(KERNEL_PARAMS)])
    extra = [p.name for p in params[len(KERNEL_PARAMS):] if p.default is inspect.Parameter.empty]
    if names != KERNEL_PARAMS or extra:
        raise TypeError(f"DMS kernel {name!r} ({KERNELS[name]}) does not follow the DMSKernel contract: parameters "
                        f"{tuple(p.name for p in params)}, expected {KERNEL_PARAMS} first (further ones with defaults)")


def load_kernel(name: str) -> DMSKernel:
    """The kernel registered as ``name`` (not "auto"), imported on first use and checked against the contract."""
    if name not in _LOADED:
        if name not in KERNELS:
            raise ValueError(f"dms.backend={name!r} is unknown; allowed: {', '.join(BACKENDS)}")
        module, attr = KERNELS[name].split(":")
        fn = getattr(importlib.import_module(module), attr)
        check_kernel(name, fn)
        _LOADED[name] = fn
    return _LOADED[name]


def resolve_backend(name: str, device_type: str) -> Tuple[str, DMSKernel]:
    """(resolved name, kernel) for a configured backend name on ``device_type``."""
    name = resolve_backend_name(name, device_type)
    return name, load_kernel(name)


__all__ = ["DMSKernel", "KERNEL_PARAMS", "KERNELS", "BACKENDS", "AUTO_BACKEND", "resolve_backend_name",
           "check_kernel", "load_kernel", "resolve_backend"]

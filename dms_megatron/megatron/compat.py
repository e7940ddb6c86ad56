"""CPU compatibility layer for megatron-core (0.16.x - 0.19.x) when torch has no CUDA.

Every patch below answers one concrete error megatron-core raises on a CPU-only torch build; each is applied only
when ``torch.cuda.is_available()`` is False, and ``apply_cpu_compat()`` is idempotent. On a GPU machine this module
does nothing. Keep all such shims here, one commented block per error.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import torch_norm
from megatron.core.transformer import utils as mutils

_APPLIED = False


class CPURNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` that forks the CPU generator.

    Answers: ``RuntimeError: Torch not compiled with CUDA enabled`` from ``torch.cuda.get_rng_state`` inside
    ``tensor_parallel.random.model_parallel_cuda_manual_seed`` / ``CudaRNGStatesTracker.add``.
    Named streams ("model-parallel-rng", "data-parallel-rng", ...) keep their own CPU generator state, so
    per-rank dropout / init streams behave as on GPU.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"rng seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _patch_rng_tracker() -> None:
    # Error: "Torch not compiled with CUDA enabled" in torch.cuda.get_rng_state, raised by
    # model_parallel_cuda_manual_seed -> CudaRNGStatesTracker.add. Fix: make initialize_rng_tracker install the
    # CPU tracker above (model_parallel_cuda_manual_seed looks both names up as module globals).
    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if mrandom._CUDA_RNG_STATE_TRACKER is None or force_reset or not isinstance(
                mrandom._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
            mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    # torch.cuda.manual_seed is lazily queued on CPU builds (no error), but keep it explicit and side-effect free.
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None


def _patch_current_device() -> None:
    # Error: "Torch not compiled with CUDA enabled" from torch.cuda.current_device(), used as a device in
    # RotaryEmbedding.get_emb, GlobalMemoryBuffer.get_tensor, DotProductAttention softmax_offset and p2p comms.
    # Fix: report the CPU device (tensors created with device="cpu" are what the CPU path needs).
    torch.cuda.current_device = lambda: "cpu"


def _patch_synchronize() -> None:
    # Error: "Torch not compiled with CUDA enabled" from torch.cuda.synchronize() in pipeline p2p
    # `_communicate` (batch_p2p_sync) and dist-checkpointing `preload_tensors`. Fix: no-op on CPU.
    torch.cuda.synchronize = lambda *a, **k: None


class _DummyStream:
    """Stands in for torch.cuda.Stream / current_stream on CPU (everything is synchronous there)."""

    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        return None

    def synchronize(self):
        return None

    def record_event(self, *a, **k):
        return _DummyEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _DummyEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        return None

    def wait(self, *a, **k):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


def _patch_streams() -> None:
    # Error: "Torch not compiled with CUDA enabled" from torch.cuda.current_stream()/Stream()/Event() in
    # DistributedDataParallel.start_grad_sync (megatron-core 0.19.x) and optimizer/bucket code paths.
    # Fix: synchronous dummy objects on CPU.
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()
    # Classes, not lambdas: libraries evaluate annotations such as `torch.cuda.Stream | None` at import time.
    torch.cuda.Stream = _DummyStream
    torch.cuda.Event = _DummyEvent
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _patch_tensor_cuda() -> None:
    # Error: "Torch not compiled with CUDA enabled" from Tensor.cuda() (pipeline schedules, grad-norm and
    # loss reductions move small tensors to "the GPU"). Fix: identity on CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self


class _CudaToCPUMode(torch.overrides.TorchFunctionMode):
    """Maps ``device="cuda"`` in tensor factories to CPU.

    Answers: "Torch not compiled with CUDA enabled" from e.g. ``torch.zeros([], device="cuda")`` and
    ``torch.tensor(..., device=torch.cuda.current_device())`` in pipeline schedules / optimizer clip_grads.
    """

    _FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.randn,
                  torch.rand, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and "cuda" in str(dev):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and args and len(args) > 1 and "cuda" in str(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.to and "cuda" in str(kwargs.get("device", "")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def cuda_to_cpu_mode() -> contextlib.AbstractContextManager:
    """Context in which ``device="cuda"`` means CPU (only needed around megatron schedule/optimizer calls)."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return _CudaToCPUMode()


def _patch_pin_memory() -> None:
    # Error: "Cannot access accelerator device when none is available" from Tensor.pin_memory() in
    # dist-checkpointing / data loaders. Fix: pinning is meaningless on CPU, return the tensor itself.
    torch.Tensor.pin_memory = lambda self, *a, **k: self


def _patch_default_causal_mask() -> None:
    # Error: "Torch not compiled with CUDA enabled" from megatron.core.transformer.utils.get_default_causal_mask
    # (torch.ones(sq, sq, device="cuda")) inside FusedScaleMaskSoftmax.forward_torch_softmax, i.e. every stock
    # DotProductAttention forward with a causal mask. Fix: the same mask built on CPU (cached like the original).
    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    mutils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _patch_clip_grads() -> None:
    # Error: AssertionError at `param.grad.type() == 'torch.cuda.FloatTensor'` in
    # megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 (called by MegatronOptimizer.step when
    # clip_grad > 0). Fix: the same in-place scaling by max_norm / (total_norm + 1e-6), without the CUDA assert.
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        for g in grads:
            if g.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"gradient clipping expects fp32/bf16 grads, got {g.dtype}")
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            with torch.no_grad():
                for g in grads:
                    g.mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _patch_float16_optimizer(cls) -> None:
    # Error: TypeError "Wrapped parameters must be one of torch.cuda.FloatTensor, torch.cuda.HalfTensor, or
    # torch.cuda.BFloat16Tensor. Received torch.BFloat16Tensor" in Float16OptimizerWithFloat16Params.__init__ (the
    # bf16 mixed-precision optimizer: fp32 main copies of bf16 parameters) and DistributedOptimizer.__init__ (the
    # same, sharded; fp32 parameters too), which sort parameters by their CUDA type name. Fix: while they sort, a CPU
    # tensor reports the CUDA name of its dtype (nothing else is CUDA-specific).
    original_init, original_type = cls.__init__, torch.Tensor.type
    names = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
             torch.bfloat16: "torch.cuda.BFloat16Tensor"}

    def cuda_named_type(self, *args, **kwargs):
        if args or kwargs or self.dtype not in names:
            return original_type(self, *args, **kwargs)
        return names[self.dtype]

    def __init__(self, *args, **kwargs):
        torch.Tensor.type = cuda_named_type
        try:
            original_init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = original_type

    cls.__init__ = __init__


def _patch_distributed_optimizer_torch_adam_step() -> None:
    # Without Apex / TE's fused Adam (always so on CPU) the distributed optimizer wraps torch Adam, which keeps its
    # step in each parameter's state (the fused ones keep it in the param groups); its load misses that three times.
    # Error 1: AssertionError at `assert len(steps) == 1` in DistributedOptimizer.state_dict, which reads the step from
    # the per-parameter state, empty until the first step; sharded_state_dict calls it, so no checkpoint could load
    # into a fresh distributed optimizer (every resume). Fix: a fresh optimizer's state dict reports step 0, what
    # torch Adam's state starts at (load_state_dict then sets the checkpoint's step from its param groups).
    # Error 2: KeyError 'step' in DistributedOptimizer._set_main_param_and_optimizer_states when a fully_reshardable
    # checkpoint loads: it copies every per-parameter state tensor from the checkpoint's, which hold no step. Fix: a
    # step the checkpoint's tensors lack stays as load_state_dict set it.
    # Error 3 (silent): a resumed run drifts from the uninterrupted one from its first step on: load_state_dict gives
    # every parameter's state the same step tensor, which torch Adam increments in place once per parameter, so the
    # bias correction runs ahead. Fix: after load_state_dict each parameter's state holds its own copy.
    cls = distrib_optimizer.DistributedOptimizer
    original, original_set, original_load = (cls.state_dict, cls._set_main_param_and_optimizer_states,
                                             cls.load_state_dict)

    def state_dict(self):
        inner = self.optimizer
        if distrib_optimizer.HAVE_APEX_OR_TE or len(inner.state):
            return original(self)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0)}
        try:
            return original(self)
        finally:
            inner.state.clear()

    def set_states(self, model_param, tensors):
        if not distrib_optimizer.HAVE_APEX_OR_TE and "step" not in tensors:
            held = self._get_main_param_and_optimizer_states(model_param)
            if "step" in held:
                tensors = dict(tensors, step=held["step"])
        return original_set(self, model_param, tensors)

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        if not distrib_optimizer.HAVE_APEX_OR_TE:
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()

    cls.state_dict = state_dict
    cls._set_main_param_and_optimizer_states = set_states
    cls.load_state_dict = load_state_dict


def _patch_torch_norm_sequence_parallel() -> None:
    # Error: AssertionError "sequence parallel not supported by torch LayerNorm" in
    # megatron.core.transformer.torch_norm.WrappedTorchNorm (every norm of the local spec when apex is absent, i.e.
    # always on CPU). Fix: the same torch norm, its weight marked `.sequence_parallel` so finalize_model_grads
    # all-reduces its partial (sequence-shard) gradients over the tensor-parallel group, as megatron's fused norms do.
    original = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        norm = original(cls, cfg, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", True)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


def apply_cpu_compat() -> bool:
    """Install every CPU shim once. Returns True if patches are (now) active, False on a CUDA machine."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _patch_rng_tracker()
    _patch_current_device()
    _patch_synchronize()
    _patch_streams()
    _patch_tensor_cuda()
    _patch_pin_memory()
    _patch_default_causal_mask()
    _patch_clip_grads()
    _patch_float16_optimizer(optimizer.Float16OptimizerWithFloat16Params)
    _patch_float16_optimizer(distrib_optimizer.DistributedOptimizer)
    _patch_distributed_optimizer_torch_adam_step()
    _patch_torch_norm_sequence_parallel()
    # megatron's advice for sequence parallel on CUDA (CUDA_DEVICE_MAX_CONNECTIONS=1) means nothing without CUDA;
    # every rank would print it.
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*", category=UserWarning)
    _APPLIED = True
    return True


__all__ = ["apply_cpu_compat", "cuda_to_cpu_mode", "CPURNGStatesTracker"]

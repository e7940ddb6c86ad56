"""A plain fine-tune step against a DMS re-fit step of the same model and layer spec, in one process, with tokens/s,
MFU and peak memory: the ``steps`` section of ``benchmarks/gpu.py`` and the CPU ``benchmarks/refit_step.py``.

plain : stock megatron GPT, next-token cross-entropy, forward + backward + megatron optimizer step.
refit : frozen teacher forward (no grad) + DMS student forward (train mode: Gumbel-sigmoid soft bias through the
        backend's kernel) + vocab-parallel KL + compression loss, backward, optimizer step - the trainer's step.
Steps alternate (plain, refit, plain, ...) after warm-up; medians are reported. MFU counts 6 * (non-embedding
parameters) + 6 * layers * seq * hidden FLOPs per token for a fwd+bwd (causal attention), plus a third of that for
the teacher's forward in the re-fit step, against ``--peak-tflops`` (H100/H200 dense bf16: 989).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from dms_megatron.config import DMSConfig, ModelConfig, TrainConfig
from dms_megatron.core.losses import compression_loss
from dms_megatron.megatron.compat import cuda_to_cpu_mode
from dms_megatron.megatron.model import build_gpt_model, transformer_config
from dms_megatron.megatron.parallel_loss import vocab_parallel_kd_loss
from dms_megatron.megatron.runtime import DMSRuntime, dms_forward
from dms_megatron.training.evaluation import lm_loss
from dms_megatron.training.optim import build_optimizer, finalize_grads, wrap_ddp

LLAMA_1B = ModelConfig(family="llama", num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                       num_query_groups=8, kv_channels=64, vocab_size=32000, max_position_embeddings=4096,
                       tie_embeddings=False, rotary_base=500000.0)
QWEN3_8B_STACK = ModelConfig(family="qwen3", num_layers=4, hidden_size=4096, ffn_hidden_size=12288,
                             num_attention_heads=32, num_query_groups=8, kv_channels=128, vocab_size=151936,
                             max_position_embeddings=40960, tie_embeddings=False, rotary_base=1000000.0,
                             norm_epsilon=1e-6)


@dataclass
class StepSetup:
    model: ModelConfig
    seq: int = 4096
    micro_batch: int = 1
    precision: str = "bf16"
    window: int = 256
    backend: str = "auto"


def _flops_per_token(mc: ModelConfig, seq: int) -> float:
    h, f, L = mc.hidden_size, mc.ffn_hidden_size, mc.num_layers
    attn_params = h * (mc.num_attention_heads + 2 * mc.num_query_groups) * mc.kv_channels + \
        mc.num_attention_heads * mc.kv_channels * h
    non_embedding = L * (attn_params + 3 * h * f)
    return 6.0 * non_embedding + 6.0 * L * seq * mc.num_attention_heads * mc.kv_channels


def _optimizer(model):
    t = TrainConfig(lr=1e-5, min_lr=1e-6, precision="bf16")
    ddp = wrap_ddp(model)
    return ddp, build_optimizer(ddp, t, next(model.parameters()).dtype)


def _batch(s: StepSetup, device):
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, s.model.vocab_size, (s.micro_batch, s.seq + 1), generator=g, device=device)
    pos = torch.arange(s.seq, device=device)[None].expand(s.micro_batch, -1)
    return ids[:, :-1], ids[:, 1:], pos


def build_step_fns(s: StepSetup, device):
    """(plain_step, refit_step): each runs one timed optimizer step and synchronises."""
    cfg = transformer_config(s.model, precision=s.precision)
    dms = DMSConfig(window=s.window, alpha_source="qneuron", backend=s.backend)
    plain = build_gpt_model(s.model, None, seq_length=s.seq, config=cfg).to(device)
    teacher = build_gpt_model(s.model, None, seq_length=s.seq, config=cfg).to(device).eval().requires_grad_(False)
    student = build_gpt_model(s.model, dms, seq_length=s.seq, config=cfg).to(device)
    (p_ddp, p_opt), (s_ddp, s_opt) = _optimizer(plain), _optimizer(student)
    tokens, labels, pos = _batch(s, device)
    vocab, ones = s.model.vocab_size, torch.ones_like(labels, dtype=torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(ddp, opt, loss_fn):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss_fn().backward()
        with cuda_to_cpu_mode():
            finalize_grads(ddp)
            opt.step()
        sync()

    def plain_loss():
        return lm_loss(p_ddp(tokens, pos, None)[..., :vocab], labels, ones)

    def refit_loss():
        with torch.no_grad():
            t_logits = teacher(tokens, pos, None)
        rt = DMSRuntime(mode="train", step=1, record_flags=False)
        with dms_forward(student, rt):
            s_logits = s_ddp(tokens, pos, None)
        kd = vocab_parallel_kd_loss(s_logits, t_logits, vocab, ones)
        return kd + compression_loss(rt.mean_fraction(), 0.75)

    return (lambda: step(p_ddp, p_opt, plain_loss)), (lambda: step(s_ddp, s_opt, refit_loss))


def measure(s: StepSetup, device, reps: int = 5, warmup: int = 2, peak_tflops: float = 989.0) -> dict:
    """Median step times (plain / refit, alternating), tokens/s, MFU and peak memory of one setup."""
    plain, refit = build_step_fns(s, device)
    times = {"plain": [], "refit": []}
    for i in range(warmup + reps):
        for name, fn in (("plain", plain), ("refit", refit)):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = s.seq * s.micro_batch
    flops = _flops_per_token(s.model, s.seq) * tokens
    out = {"model": {k: getattr(s.model, k) for k in ("family", "num_layers", "hidden_size", "num_attention_heads",
                                                      "num_query_groups", "ffn_hidden_size", "vocab_size")},
           "seq": s.seq, "micro_batch": s.micro_batch, "precision": s.precision, "spec": s.model.spec,
           "window": s.window}
    for name, extra in (("plain", 1.0), ("refit", 4.0 / 3.0)):  # re-fit: + the teacher's forward (1/3 of fwd+bwd)
        ms = statistics.median(times[name]) * 1e3
        out[name] = {"ms": ms, "tokens_per_s": tokens / ms * 1e3,
                     "mfu": flops * extra / (ms / 1e3) / (peak_tflops * 1e12)}
    out["refit_over_plain"] = out["refit"]["ms"] / out["plain"]["ms"]
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def step_table(args) -> dict:
    """The steps section: the Llama-like 1.2B model with each available spec, and a Qwen3-8B layer stack."""
    device = torch.device("cuda")
    rows, t0 = [], time.time()
    setups = [StepSetup(LLAMA_1B), StepSetup(QWEN3_8B_STACK)]
    if _te_available():
        setups.insert(1, StepSetup(replace(LLAMA_1B, spec="te")))
    for s in setups[:1] if args.quick else setups:
        torch.cuda.reset_peak_memory_stats()
        try:
            rows.append(measure(s, device, reps=args.reps, peak_tflops=args.peak_tflops))
        except Exception as e:  # noqa: BLE001 - one failing setup must not hide the others' numbers
            rows.append({"spec": s.model.spec, "model": s.model.num_layers, "error": f"{type(e).__name__}: {e}"})
        print(f"  {rows[-1]}", flush=True)
        torch.cuda.empty_cache()
    return {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "te": _te_available(),
                     "seconds": round(time.time() - t0, 1)}, "cells": rows}


def _te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401  (optional: the te spec rows need it)
    except ImportError:
        return False
    return True


def step_markdown(result: dict) -> str:
    rows = ["| model | spec | plain step | refit step | refit / plain | plain tok/s | plain MFU | refit MFU | peak |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        if "error" in c:
            rows.append(f"| {c['model']} | {c['spec']} | error: {c['error'][:80]} | | | | | | |")
            continue
        m = c["model"]
        name = f"{m['family']} {m['num_layers']}x{m['hidden_size']}"
        rows.append(f"| {name} | {c['spec']} | {c['plain']['ms']:.0f} ms | {c['refit']['ms']:.0f} ms | "
                    f"{c['refit_over_plain']:.2f} | {c['plain']['tokens_per_s']:,.0f} | {c['plain']['mfu']:.1%} | "
                    f"{c['refit']['mfu']:.1%} | {c.get('peak_gib', float('nan')):.1f} GiB |")
    return "\n".join(rows)


__all__ = ["StepSetup", "measure", "step_table", "step_markdown", "LLAMA_1B", "QWEN3_8B_STACK"]

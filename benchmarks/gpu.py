"""GPU benchmarks of dms-megatron on one CUDA device: writes JSON, prints markdown tables.

  python benchmarks/gpu.py --out gpu.json                                   # everything (< 8 min on an H100/H200)
  python benchmarks/gpu.py --only kernels --out gpu-kernels.json           # L = 4k..32k, windows 256 / 512
  python benchmarks/gpu.py --only steps --out gpu-steps.json               # plain vs re-fit model steps
  python benchmarks/gpu.py --quick --out /tmp/quick.json                   # smallest configurations (smoke run)

Sections (``--only``; default: all): ``steps`` = a plain fine-tune step against a DMS re-fit step (teacher forward
included) of a Llama-like 1.2B model (16 layers, hidden 2048, 32/8 heads, ffn 8192, vocab 32k, seq 4096, micro
batch 1, bf16) with the local spec and, where transformer-engine imports, the TE spec, and of a Qwen3-8B-shaped
4-layer stack: step times, tokens/s, MFU, peak memory (``model_steps.py``). ``kernels`` = fwd+bwd time and
extra peak memory of the attention kernels
(bf16, batch 1, 32 query / 8 KV heads, head dim 128): torch causal SDPA (flash), flex without bias, flex DMS,
dense DMS (where it fits), the exact two-part split on flash kernels, and the Triton DMS kernel. Times are
medians of CUDA-event timings after warm-up (compiles and autotuning happen in the warm-up); ratios are against
SDPA on the same q/k/v; "extra" = peak memory during one fwd+bwd minus the memory held before it. The DMS
kernels' outputs are cross-checked against the Triton kernel's (max_abs_diff_vs_triton, bf16).
Refuses to run without CUDA (exit 2).
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import PackageNotFoundError, version
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dms_megatron.core.dense_dms import dense_dms_attention  # noqa: E402
from dms_megatron.core.flex_dms import flex_dms_attention  # noqa: E402
from dms_megatron.megatron.distributed import init_process_groups  # noqa: E402

from model_steps import step_markdown, step_table  # noqa: E402
from dms_megatron.core.triton_dms import autotune_picks, triton_dms_attention  # noqa: E402
from dms_megatron.core.two_part import two_part_dms_attention  # noqa: E402

B, NP, NG, HN = 1, 32, 8, 128
LENGTHS, WINDOWS = (4096, 8192, 16384, 32768), (256, 512)
DENSE_GIB_AT_4K = 8.5 * 1.1  # measured extra of the dense kernel at L=4096 with these shapes (+10%), grows as L^2
GIB = 2 ** 30


def _sdpa(q, k, v, z, w):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _flex_plain(q, k, v, z, w):
    return flex_dms_attention(q, k, v, None, w, compiled=True)


KERNELS = {  # name -> (fn(q, k, v, z, window), uses the eviction logits)
    "sdpa": (_sdpa, False),
    "flex_nobias": (_flex_plain, False),
    "flex_dms": (lambda q, k, v, z, w: flex_dms_attention(q, k, v, z, w, compiled=True), True),
    "dense_dms": (lambda q, k, v, z, w: dense_dms_attention(q, k, v, z, w), True),
    "two_part": (lambda q, k, v, z, w: two_part_dms_attention(q, k, v, z, w), True),
    "triton": (lambda q, k, v, z, w: triton_dms_attention(q, k, v, z, w), True),
}


def _inputs(L: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(B, NP, L, HN), mk(B, NG, L, HN), mk(B, NG, L, HN)
    z = torch.randn(B, NG, L, generator=g, device="cuda") * 3 - 2                      # ~25% keys leaning evict
    z[..., -1] = -float("inf")
    go = mk(B, NP, L, HN)
    return [t.requires_grad_(True) for t in (q, k, v, z)], go


def _fwd_bwd(fn, uses_z, leaves, go, w):
    q, k, v, z = leaves
    out = fn(q, k, v, z if uses_z else None, w)
    out.backward(go)
    return out


def _time(fn, uses_z, leaves, go, w, reps: int, warmup: int = 2) -> float:
    """Median ms of fwd+bwd (CUDA events) after ``warmup`` untimed runs."""
    for _ in range(warmup):
        _fwd_bwd(fn, uses_z, leaves, go, w)
    times = []
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _fwd_bwd(fn, uses_z, leaves, go, w)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _extra_peak(fn, uses_z, leaves, go, w):
    """(GiB above the memory held before one fwd+bwd, that run's output)."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _fwd_bwd(fn, uses_z, leaves, go, w).detach()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB, out


def _skip_reason(name: str, L: int) -> str:
    if name == "dense_dms":
        need = DENSE_GIB_AT_4K * (L / 4096) ** 2
        free = torch.cuda.mem_get_info()[0] / GIB
        if need > 0.8 * free:
            return f"needs ~{need:.0f} GiB (L x L bias and scores), {free:.0f} GiB free"
    return ""


def _cell(name, L, w, leaves, go, reps, ref_out) -> dict:
    """One (kernel, L, window) measurement; errors are recorded, not raised (the table goes on)."""
    fn, uses_z = KERNELS[name]
    cell = {"kernel": name, "L": L, "window": w}
    why = _skip_reason(name, L)
    if why:
        return {**cell, "skipped": why}
    try:
        cell["ms"] = _time(fn, uses_z, leaves, go, w, reps)
        cell["extra_gib"], out = _extra_peak(fn, uses_z, leaves, go, w)
        if uses_z:
            cell["max_abs_diff_vs_triton"] = (out.float() - ref_out.float()).abs().max().item()
    except Exception as e:  # noqa: BLE001 - recorded in the JSON and printed; main exits 1
        cell["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        for t in leaves:
            t.grad = None
        torch.cuda.empty_cache()
    return cell


def kernel_table(args) -> dict:
    """The kernels section: every kernel at every (L, window); returns {"meta", "cells"}."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)  # 2 flex graphs per L
    lengths, windows = ((4096,), (256,)) if args.quick else (args.lengths or LENGTHS, WINDOWS)
    cells, t0 = [], time.time()
    for L in lengths:
        leaves, go = _inputs(L)
        for w in windows:
            with torch.no_grad():  # reference output of the DMS kernels' cross-check
                ref = triton_dms_attention(*(t.detach() for t in leaves), w)
            for name in KERNELS:
                if time.time() - t0 > args.max_seconds:
                    cells.append({"kernel": name, "L": L, "window": w, "skipped": f"over --max-seconds {args.max_seconds}"})
                    continue
                cells.append(_cell(name, L, w, leaves, go, args.reps, ref))
                print(f"  {json.dumps(cells[-1])}", flush=True)
            del ref
        del leaves, go
        torch.cuda.empty_cache()
    _add_ratios(cells)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": _version("triton"),
            "shape": {"b": B, "np": NP, "ng": NG, "hn": HN, "dtype": "bf16"}, "reps": args.reps,
            "seconds": round(time.time() - t0, 1), "triton_autotune": autotune_picks()}
    return {"meta": meta, "cells": cells}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _add_ratios(cells) -> None:
    sdpa = {(c["L"], c["window"]): c for c in cells if c["kernel"] == "sdpa" and "ms" in c}
    for c in cells:
        base = sdpa.get((c["L"], c["window"]))
        if base and "ms" in c:
            c["ratio"] = c["ms"] / base["ms"]
            c["extra_gib_minus_sdpa"] = c["extra_gib"] - base["extra_gib"]


def kernel_markdown(result: dict) -> str:
    names = list(KERNELS)
    rows = ["| L | w | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    keys = sorted({(c["L"], c["window"]) for c in result["cells"]})
    for L, w in keys:
        by = {c["kernel"]: c for c in result["cells"] if (c["L"], c["window"]) == (L, w)}
        out = []
        for n in names:
            c = by.get(n, {})
            if "ms" in c:
                out.append(f"{c['ms']:.2f} ms ({c['ratio']:.2f}x), +{c['extra_gib']:.2f} GiB")
            else:
                out.append("error" if "error" in c else "–")
        rows.append(f"| {L} | {w} | " + " | ".join(out) + " |")
    notes = [f"- {c['kernel']} L={c['L']} w={c['window']}: {c.get('error') or c.get('skipped')}"
             for c in result["cells"] if "error" in c or "skipped" in c]
    return "\n".join(rows + ([""] + notes if notes else []))


SECTIONS = {"steps": (step_table, step_markdown), "kernels": (kernel_table, kernel_markdown)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(SECTIONS), action="append", help="section(s) to run (default: all)")
    ap.add_argument("--out", type=Path, default=Path("gpu-benchmarks.json"), help="JSON output path")
    ap.add_argument("--quick", action="store_true", help="smallest configuration only (smoke run)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (median)")
    ap.add_argument("--lengths", type=int, nargs="+", help=f"kernels: sequence lengths (default {LENGTHS})")
    ap.add_argument("--max-seconds", type=float, default=170.0, help="kernels: skip cells started after this")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="steps: the chip's dense bf16 peak (MFU)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False): run it on the GPU "
              "machine", file=sys.stderr)
        return 2
    init_process_groups(1, 1)  # one rank (nccl): the model steps build megatron models
    results = {}
    for name in args.only or list(SECTIONS):
        table, markdown = SECTIONS[name]
        print(f"## {name}", flush=True)
        results[name] = table(args)
        print(markdown(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    failed = [c for r in results.values() for c in r.get("cells", []) if "error" in c]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

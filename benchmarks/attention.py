"""DMS core attention cost vs plain causal attention, measured in one run (ratios are what to read).

  python benchmarks/attention.py            # L = 512, 1024, 2048
  python benchmarks/attention.py --quick    # L = 128, 256 (smoke run)

1. time: fwd+bwd of the dense DMS kernel (soft training bias, gradient w.r.t. the eviction logits) vs
   torch's causal SDPA fwd+bwd on the same q/k/v. Runs are interleaved (plain, dms, plain, dms, ...) and the
   median is taken so machine noise hits both sides alike.
2. memory: peak resident-memory growth of one no-grad forward (fresh process per measurement, after a warm-up
   that also compiles flex) for plain causal SDPA, the dense backend (materialised [b, np, L, L] bias) and the
   flex backend (compiled flex_attention; O(L) per-key bias vector + block mask). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dms_megatron.core.dense_dms import dense_dms_attention
from dms_megatron.core.flex_dms import flex_dms_attention

B, NP, NG, HN, WINDOW = 1, 8, 2, 64, 256


def _inputs(L, grad):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, NP, L, HN, generator=g, requires_grad=grad)
    k = torch.randn(B, NG, L, HN, generator=g, requires_grad=grad)
    v = torch.randn(B, NG, L, HN, generator=g, requires_grad=grad)
    z = torch.randn(B, NG, L, generator=g)
    z[..., -1] = -float("inf")
    z.requires_grad_(grad)
    return q, k, v, z


def _plain(q, k, v, z):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _dms(q, k, v, z):
    return dense_dms_attention(q, k, v, z, WINDOW)


def _fwd_bwd(fn, L):
    q, k, v, z = _inputs(L, True)
    t0 = time.perf_counter()
    fn(q, k, v, z).sum().backward()
    return time.perf_counter() - t0


def time_ratio(L, reps):
    plain, dms = [], []
    _fwd_bwd(_plain, L), _fwd_bwd(_dms, L)  # warm-up
    for _ in range(reps):
        plain.append(_fwd_bwd(_plain, L))
        dms.append(_fwd_bwd(_dms, L))
    return statistics.median(plain), statistics.median(dms)


def _child_peak(kind: str, L: int) -> None:
    """In a fresh process: warm up (compiles flex), reset the peak-RSS counter, run one no-grad forward and print
    the peak resident-set growth in bytes (Linux: /proc/self/clear_refs + VmHWM)."""
    fns = {"plain": _plain, "dense": _dms,
           "flex": lambda q, k, v, z: flex_dms_attention(q, k, v, z, WINDOW, compiled=True)}
    fn = fns[kind]
    q, k, v, z = _inputs(L, False)
    with torch.no_grad():
        fn(q, k, v, z)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        out = fn(q, k, v, z)
        peak = _status_kb("VmHWM")
    del out
    print((peak - base) * 1024)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(kind: str, L: int) -> int:
    r = subprocess.run([sys.executable, __file__, "--mem-child", kind, str(L)], capture_output=True, text=True,
                       check=True)
    return int(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mem-child", nargs=2, metavar=("KIND", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_child:
        return _child_peak(args.mem_child[0], int(args.mem_child[1]))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lengths = [128, 256] if args.quick else [512, 1024, 2048]
    reps = 2 if args.quick else args.reps
    print(f"b={B} np={NP} ng={NG} hn={HN} window={WINDOW} threads={torch.get_num_threads()} torch {torch.__version__}")
    print("\nfwd+bwd time (median of interleaved runs)")
    print(f"{'L':>6} {'plain ms':>10} {'dms dense ms':>13} {'ratio':>7}")
    for L in lengths:
        p, d = time_ratio(L, reps)
        print(f"{L:>6} {p * 1e3:>10.1f} {d * 1e3:>13.1f} {d / p:>7.2f}")

    print("\nforward peak RSS growth, fresh process per cell (MiB); extra = backend - plain causal SDPA")
    print(f"{'L':>6} {'plain':>8} {'dense +':>9} {'flex +':>8}")
    for L in lengths:
        base = peak_bytes("plain", L)
        dense = peak_bytes("dense", L) - base
        flex = peak_bytes("flex", L) - base
        print(f"{L:>6} {base / 2**20:>8.2f} {dense / 2**20:>9.2f} {flex / 2**20:>8.2f}")


if __name__ == "__main__":
    main()

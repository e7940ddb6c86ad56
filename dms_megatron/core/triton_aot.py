"""Ahead-of-time compile of the Triton DMS kernels for a GPU that is not here: Triton's own compiler and the ptxas
it ships, on any machine (no GPU, no CUDA driver), for every autotune candidate of ``triton_dms.AUTOTUNE``, with the
arguments of a real launch (built by the launch code itself, specialised as Triton's JIT does).

  python -m dms_megatron.core.triton_aot                              # sm_90a (H100 / H200), bf16, 32/8 heads, 128
  python -m dms_megatron.core.triton_aot --arch 80 --head-dim 64 --json aot.json

It finds what Triton's CPU interpreter cannot: a kernel that does not compile for the chip, a candidate that needs
more shared memory than the chip has (the autotuner drops it silently at run time), a candidate that spills
registers (local-memory traffic in the inner loop), and a dot that misses the chip's tensor-core instruction
(wgmma on Hopper). It measures no speed. Exit 1 if a candidate fails to compile or does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dms_megatron.core import triton_dms

# Opt-in shared memory per block (bytes), CUDA programming guide, "compute capabilities" table.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Shape:
    """The launch whose arguments are compiled: the benchmark's attention shape by default."""
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    seq: int = 4096
    head_dim: int = 128
    window: int = 256
    dtype: str = "bf16"
    bias_grad: bool = True          # soft decisions (training); False: hard decisions, no d(logits)


def sample_calls(shape: Shape) -> list:
    """[forward, delta, dK/dV, dQ] KernelCalls of one soft-bias fwd+bwd at ``shape``, on unallocated CPU tensors
    (torch.empty: only strides, dtypes and 16-byte alignment matter)."""
    dt = DTYPES[shape.dtype]
    b, np_, ng, L, hn = shape.batch, shape.heads, shape.kv_heads, shape.seq, shape.head_dim
    q = torch.empty(b, np_, L, hn, dtype=dt)
    k, v = torch.empty(b, ng, L, hn, dtype=dt), torch.empty(b, ng, L, hn, dtype=dt)
    kb = torch.empty(b, ng, L, dtype=torch.float32)
    scale = hn ** -0.5
    fwd, out, lse = triton_dms.forward_call(q, k, v, kb, True, shape.window, scale)
    bwd, _ = triton_dms.backward_calls(q, k, v, kb, True, out, lse, torch.empty_like(out), shape.window, scale,
                                       shape.bias_grad, triton_dms.DELTA_ROWS)
    return [fwd, *bwd]


def _source(kernel, call, tiles: dict, target):
    """Triton's ASTSource for ``call`` with ``tiles``, specialised like the JIT's launch (ints equal to 1 become
    constants, ints and pointers divisible by 16 get the divisibility hint)."""
    from triton.compiler import ASTSource, make_backend  # optional: see triton_dms._kernels
    from triton._C.libtriton import native_specialize_impl  # Triton's JIT specialiser (triton 3.7)

    backend = type(make_backend(target))
    bound = inspect.signature(kernel.fn).bind(*call.args, **call.consts, **tiles).arguments
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(bound.items()):
        if name in call.consts or name in tiles:
            kind, spec = "constexpr", None
        else:
            kind, spec = native_specialize_impl(backend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = value
        elif spec:
            attrs[(i,)] = backend.parse_attr(spec)
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _capability(arch: str) -> int:
    """"90a" -> 90: the compute capability of an sm_ARCH name."""
    return int(arch.rstrip("a"))


def _tool(name: str, arch: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas  # optional: see triton_dms._kernels

    ptxas = get_ptxas(_capability(arch)).path
    return ptxas if name == "ptxas" else str(Path(ptxas).with_name(name))


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes per thread from ``ptxas -v`` (the flags Triton compiles with)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([_tool("ptxas", arch), "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}", str(src),
                            "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return {"registers": int(regs.group(1)), "spill_store_bytes": int(spill.group(1)),
            "spill_load_bytes": int(spill.group(2))}


def tile_loop_spills(sass: str) -> int:
    """Local-memory loads and stores (LDL / STL: spill traffic) inside the innermost tile loops of a SASS listing.
    A loop is the address range of a backward branch; a tile loop holds a tensor-core instruction (HGMMA / HMMA);
    the innermost are those holding no other tile loop. Spills elsewhere run once per tile or head, not per step."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in ins:
        b = re.search(r"\bBRA(?:\.\S+)?\s+(?:.*?)(0x[0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            loops.append((int(b.group(1), 16), addr))
    tiles = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and re.search(r"\bH[G]?MMA\b", t) for a, t in ins)]
    inner = [(lo, hi) for lo, hi in tiles
             if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in tiles)]
    return sum(1 for a, t in ins if re.search(r"\b(LDL|STL)\b", t) and any(lo <= a <= hi for lo, hi in inner))


def _sass(cubin: bytes, arch: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"
        f.write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump", arch), "-sass", str(f)], capture_output=True, text=True,
                              check=True).stdout


def compile_call(call, config, arch: str = "90a") -> dict:
    """Compile ``call`` with one autotune ``config`` (row tile, column tile, warps, stages) for sm_``arch``;
    ``config`` None: a kernel with fixed tiles (in its consts), launched with Triton's default warps and stages."""
    from triton import compile as triton_compile  # optional: see triton_dms._kernels
    from triton.backends.compiler import GPUTarget  # optional: see triton_dms._kernels

    mod = triton_dms._kernels()
    if config is None:
        tiles, warps, stages = {}, 4, 3
    else:
        rows, cols, warps, stages = config
        row_tile, _, col_tile, _ = triton_dms.TILES[call.name]
        tiles = {row_tile: rows, col_tile: cols}
    cap = _capability(arch)
    target = GPUTarget("cuda", cap, 32)
    t0 = time.time()
    src = _source(getattr(mod, call.name), call, tiles, target)
    ck = triton_compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    ptx = ck.asm["ptx"]
    row = {"kernel": call.name, "config": None if config is None else list(config), "shared_bytes": ck.metadata.shared,
           "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"), **_ptxas_usage(ptx, arch),
           "tile_loop_spills": tile_loop_spills(_sass(ck.asm["cubin"], arch))}
    row["fits"] = row["shared_bytes"] <= SHARED_LIMIT.get(cap, 0)
    row["compile_s"] = round(time.time() - t0, 1)
    return row


def report(shape: Shape, arch: str = "90a", configs: dict | None = None) -> list:
    """One row per (kernel, candidate); a candidate that does not compile gets ``error`` instead of numbers."""
    rows = []
    for call in sample_calls(shape):
        fixed = [] if call.name in triton_dms.TILES else [None]                    # tuned kernels need a config
        for config in (configs or triton_dms.AUTOTUNE).get(call.name) or fixed:
            try:
                rows.append(compile_call(call, config, arch))
            except Exception as e:  # noqa: BLE001 - reported per candidate; main exits 1
                rows.append({"kernel": call.name, "config": None if config is None else list(config),
                             "error": f"{type(e).__name__}: {e}"[:400]})
    return rows


def markdown(rows: list) -> str:
    out = ["| kernel | tiles, warps, stages | registers | spill bytes (st/ld) | spills in tile loops | shared KiB "
           "| fits | wgmma | mma.sync |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        cfg = "fixed" if c is None else f"{c[0]}x{c[1]}, {c[2]}w, {c[3]}s"
        if "error" in r:
            out.append(f"| {r['kernel']} | {cfg} | error: {r['error'][:120]} | | | | | | |")
            continue
        out.append(f"| {r['kernel']} | {cfg} | {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | "
                   f"{r['tile_loop_spills']} | {r['shared_bytes'] / 1024:.0f} | {'yes' if r['fits'] else 'NO'} | "
                   f"{r['wgmma']} | {r['mma_sync']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90a", help="sm_ARCH to compile for (default 90a: H100 / H200)")
    for f in ("heads", "kv_heads", "seq", "head_dim", "window"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(Shape(), f))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    shape = Shape(heads=args.heads, kv_heads=args.kv_heads, seq=args.seq, head_dim=args.head_dim,
                  window=args.window, dtype=args.dtype)
    if not args.arch.rstrip("a").isdigit() or _capability(args.arch) not in SHARED_LIMIT:
        print(f"triton_aot: --arch {args.arch} unknown: use one of {sorted(SHARED_LIMIT)} (90a for Hopper)",
              file=sys.stderr)
        return 2
    if triton_dms._interpreting():
        print("triton_aot compiles for a GPU, not for Triton's interpreter: run it without TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    try:
        triton_dms._kernels()
    except ImportError as e:
        print(f"triton_aot: {e}", file=sys.stderr)
        return 2
    rows = report(shape, args.arch)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "shape": dataclasses.asdict(shape), "rows": rows},
                                        indent=1))
    return 1 if any("error" in r or not r["fits"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

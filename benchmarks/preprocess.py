"""Tokenization throughput of tools/preprocess_data.py at 1 and 2 workers, measured in one run (ratios are what to
read), and against Megatron-LM's own tools/preprocess_data.py where it is importable.

  python benchmarks/preprocess.py               # ~20 MB of standard-library text as JSONL
  python benchmarks/preprocess.py --mb 4        # smaller corpus
  python benchmarks/preprocess.py --baseline OLD/tools/preprocess_data.py   # adds another version's single process

Each configuration runs as the command a user types (a fresh process: start-up included), over the same JSONL of
standard-library source text, with the shipped tiny teacher's tokenizer (byte-level BPE, Hugging Face fast
tokenizer). tokens/s = tokens written / wall seconds. Runs are interleaved (1, 2, 1, 2, ...) and the median is taken,
so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dms_megatron.data.corpus import stdlib_texts
from dms_megatron.data.embedded import TEACHER_DIR

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ""


def _corpus(path: Path, mb: float) -> None:
    with open(path, "w") as f:
        n = 0
        while n < mb * 2**20:
            for t in stdlib_texts(4_000_000, chunk_chars=4000):
                line = json.dumps({"text": t}) + "\n"
                f.write(line)
                n += len(line)
                if n >= mb * 2**20:
                    break


def _run(src: Path, out: Path, workers) -> float:
    """Wall seconds of one command (start-up, reading, tokenizing, writing)."""
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py") if workers != "baseline" else BASELINE,
           "--input", str(src), "--tokenizer", str(TEACHER_DIR), "--output-prefix", str(out)]
    if workers != "baseline":
        cmd += ["--workers", str(workers), "--append-eod", "--log-interval", "100000000"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="another preprocess_data.py (its single process) to time too")
    args = ap.parse_args()
    global BASELINE
    BASELINE = args.baseline or ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        _corpus(src, args.mb)
        times = {1: [], 2: [], **({"baseline": []} if args.baseline else {})}
        for _ in range(args.repeats):
            for w in times:
                times[w].append(_run(src, Path(tmp) / f"w{w}", w))
        tokens = (Path(tmp) / "w1.bin").stat().st_size // 2  # uint16 ids
        assert (Path(tmp) / "w1.bin").read_bytes() == (Path(tmp) / "w2.bin").read_bytes()
        rate = {w: tokens / statistics.median(t) for w, t in times.items()}
        print(f"corpus {src.stat().st_size / 2**20:.1f} MB, {tokens:,} tokens; median of {args.repeats} runs")
        for w, r in rate.items():
            name = f"--workers {w}" if w != "baseline" else f"baseline {args.baseline}"
            print(f"  {name}: {r / 1e6:.3f} M tokens/s ({statistics.median(times[w]):.1f} s)")
        print(f"  ratio 2 workers / 1 worker: {rate[2] / rate[1]:.2f}")
        if args.baseline:
            assert (Path(tmp) / "wbaseline.bin").read_bytes() == (Path(tmp) / "w1.bin").read_bytes()
            print(f"  ratio 1 worker / baseline: {rate[1] / rate['baseline']:.2f}, "
                  f"2 workers / baseline: {rate[2] / rate['baseline']:.2f}")
        if importlib.util.find_spec("megatron.training") is None:
            print("  Megatron-LM's tools/preprocess_data.py: not comparable here (megatron.training, Megatron-LM's "
                  "own package, is not installed; it is not on PyPI)")


if __name__ == "__main__":
    main()

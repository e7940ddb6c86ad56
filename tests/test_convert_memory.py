"""Peak memory of streaming conversion on a ~4 GB fp32 checkpoint (slow: writes ~12 GB to disk).

The figure is peak RSS of the converting process / bytes of the checkpoint's tensors. Measured (torch 2.13 CPU,
megatron-core 0.16.1): 4.13 GB checkpoint -> import 1.23x, export 1.20x (an earlier build of the converter: 1.18x /
1.17x); 1.97 GB -> 1.375x, 1.371x. The HF side holds at most one tensor at a time; what is left above the model
itself is a fixed ~0.39 GB of interpreter + torch + megatron-core and one transient copy of the largest tensor (the
32K-vocab embedding, padded for tp), so the ratio falls with model size. (Before weights-only checkpoints stored the
tp=1 SwiGLU fc1 as one ShardedTensor, megatron's gate/up factory made dist-checkpointing copy every fc1 weight:
1.55-1.60x.)
The HF checkpoint is synthesised tensor by tensor with the streaming writer (never held in memory)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dms_megatron.config import ModelConfig
from dms_megatron.convert.hf_io import write_safetensors_streaming
from dms_megatron.convert.mapping import export_plan
from dms_megatron.families import family_by_name
from dms_megatron.families.rules import bind_rules

REPO = Path(__file__).resolve().parents[1]
MAX_RSS_RATIO = 1.3  # the requirement; measured 1.20-1.23x at this size, see the module docstring
SHARD_BYTES = 512 * 1024 ** 2
# ~1.03B parameters = ~4.13 GB in fp32
BIG = dict(family="llama", num_layers=20, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
           num_query_groups=4, kv_channels=None, vocab_size=32000, max_position_embeddings=4096, tie_embeddings=False,
           rotary_base=500000.0)

_MEASURE = """
import resource, runpy, sys
sys.argv = ["dms-convert"] + sys.argv[1:]
try:
    runpy.run_module("dms_megatron.launch.convert", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def synthesise_hf_checkpoint(path: Path, cfg: ModelConfig) -> int:
    """A random Llama checkpoint (sharded safetensors + config.json) written one tensor at a time; returns bytes."""
    fam = family_by_name(cfg.family)
    bound = bind_rules(fam.rules, cfg)
    plan = export_plan(bound, lambda b: torch.float32)
    g = torch.Generator().manual_seed(0)
    path.mkdir(parents=True)
    write_safetensors_streaming(path, plan, lambda n: torch.randn([p.shape for p in plan if p.name == n][0],
                                                                   generator=g) * 0.02,
                                max_shard_bytes=SHARD_BYTES)
    (path / "config.json").write_text(json.dumps(fam.to_hf(cfg)))
    return sum(p.nbytes for p in plan)


def peak_rss_bytes(*args) -> int:
    r = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, cwd=REPO,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("PEAK_RSS_KB")][-1]
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_streaming_conversion_peak_rss_bound(tmp_path):
    cfg = ModelConfig(**BIG)
    size = synthesise_hf_checkpoint(tmp_path / "hf", cfg)
    imp = peak_rss_bytes("import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "meg"))
    exp = peak_rss_bytes("export", "--megatron-path", str(tmp_path / "meg"), "--hf-path", str(tmp_path / "out"),
                         "--format", "plain", "--max-shard-size-mb", str(SHARD_BYTES // 1024 ** 2))
    print(f"checkpoint {size / 1e9:.2f} GB; peak RSS import {imp / 1e9:.2f} GB ({imp / size:.2f}x), "
          f"export {exp / 1e9:.2f} GB ({exp / size:.2f}x)")
    assert imp <= MAX_RSS_RATIO * size and exp <= MAX_RSS_RATIO * size

"""benchmarks/gpu.py without a GPU: it refuses with exit 2; its table arithmetic and markdown on synthetic cells."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(gpu_bench, capsys, tmp_path):
    assert gpu_bench.main(["--only", "kernels", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err
    assert not (tmp_path / "x.json").exists()


def test_ratios_and_markdown(gpu_bench):
    cells = [{"kernel": "sdpa", "L": 4096, "window": 256, "ms": 2.0, "extra_gib": 0.5},
             {"kernel": "triton", "L": 4096, "window": 256, "ms": 3.0, "extra_gib": 0.75},
             {"kernel": "dense_dms", "L": 4096, "window": 256, "skipped": "needs ~9 GiB"},
             {"kernel": "two_part", "L": 4096, "window": 256, "error": "RuntimeError: boom"}]
    gpu_bench._add_ratios(cells)
    assert cells[1]["ratio"] == 1.5 and cells[1]["extra_gib_minus_sdpa"] == 0.25 and cells[0]["ratio"] == 1.0
    md = gpu_bench.kernel_markdown({"cells": cells}).splitlines()
    assert md[0].startswith("| L | w | sdpa | flex_nobias | flex_dms | dense_dms | two_part | triton |")
    assert md[2].startswith("| 4096 | 256 | 2.00 ms (1.00x), +0.50 GiB | – | – | – | error | 3.00 ms (1.50x)")
    assert any("two_part L=4096 w=256: RuntimeError: boom" in line for line in md)
    assert any("dense_dms L=4096 w=256: needs ~9 GiB" in line for line in md)


def test_model_step_section_runs_on_a_tiny_model(gpu_bench, megatron_single):
    """The steps section's measurement (the same code the GPU run uses) on CPU with a tiny fp32 model: both steps
    run, and the reported numbers are consistent."""
    import model_steps as steps

    from dms_megatron.config import ModelConfig

    tiny = ModelConfig(family="llama", kv_channels=None, tie_embeddings=False, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       vocab_size=96, make_vocab_size_divisible_by=32, max_position_embeddings=64)
    out = steps.measure(steps.StepSetup(tiny, seq=32, micro_batch=2, precision="fp32", window=4),
                        torch.device("cpu"), reps=2, warmup=1, peak_tflops=1.0)
    for name in ("plain", "refit"):
        assert out[name]["ms"] > 0 and out[name]["tokens_per_s"] == pytest.approx(64 / out[name]["ms"] * 1e3)
    assert out["refit_over_plain"] == pytest.approx(out["refit"]["ms"] / out["plain"]["ms"])
    md = steps.step_markdown({"cells": [out, {"spec": "te", "model": 16, "error": "ConfigError: no TE"}]})
    assert "| llama 2x64 | local |" in md and "error: ConfigError: no TE" in md
    # FLOPs per token: 6 x non-embedding parameters + causal attention
    per_layer = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 128
    assert steps._flops_per_token(tiny, 32) == 6 * 2 * per_layer + 6 * 2 * 32 * 4 * 16

"""``dms-dryrun``'s per-rank memory estimate against the measured peak resident set of CPU re-fits.

On CPU every term of the estimate lives in host memory, in fp32 (``train.precision=auto``) with the dense DMS kernel
(``dms.backend=auto``): ``estimate(cfg, dp, device="cpu")``. Each rank records (report.json ``memory``) its resident
set right before the build stage (the interpreter, torch, megatron and the process groups: ~500 MiB, not in the
estimate), right after it (models, DDP, optimizer built) and its peak (getrusage). The test compares, for the
busiest rank against the busiest pipeline stage's estimate, within +-30%:

  built:  after-build - before-build  vs  student params + teacher params + grads  (Adam's moments appear at the
          first step)
  peak:   peak - before-build         vs  the estimate's total: student params + grads + optimizer + teacher params
          + activations + logits

The model (4 layers, hidden 512, SwiGLU 1536, 8 query / 4 KV heads, vocabulary 8192, 128-token sequences, micro
batch 2) puts every term at tens of MiB (logits ~12 MiB per tp rank). The ranks run with glibc's mmap threshold
fixed (MALLOC_MMAP_THRESHOLD_): with its default dynamic threshold glibc keeps freed tensor memory resident (the
build's weight-initialisation temporaries, the previous step's activations), which is allocator slack, not a term
of the estimate (on GPU, the caching allocator's reserve is not in it either); the threshold fixed, the resident
set follows the live tensors. The measured numbers are in docs/architecture.md ("dms-dryrun").

  pytest -m scale tests/test_dry_run_memory.py   (CI runs it in its scale step)
"""

import json

import pytest

from refit_fixtures import refit_dict, shared_assets
from spawn_util import torchrun_harness

MiB = 2 ** 20
SHAPE = dict(num_layers=4, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8, num_query_groups=4,
             vocab_size=8192, max_position_embeddings=128)
SEQ, STEPS = 128, 2  # the peak is in step 2: Adam's moments (allocated by step 1) and step 2's activations
TOLERANCE = 0.3
MMAP_THRESHOLD = 64 * 1024  # bytes: glibc returns every allocation above this to the system when it is freed


def test_resident_set_measures_follow_an_allocation():
    import torch

    from dms_megatron.training.memory import gather_per_rank, peak_rss_bytes, rss_bytes

    before = rss_bytes()
    x = torch.ones(64 * MiB // 4)  # 64 MiB, written: resident
    assert 60 * MiB < rss_bytes() - before < 72 * MiB
    del x
    assert peak_rss_bytes() >= before + 60 * MiB  # the peak keeps it after the tensor is freed
    assert gather_per_rank({"a": 1, "b": 2}) == {"a": [1], "b": [2]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory, **SHAPE)


@pytest.mark.scale
@pytest.mark.parallel
@pytest.mark.parametrize("tp,pp,nproc", [(1, 1, 1), (2, 1, 2), (2, 2, 4)], ids=["one-rank", "tp2", "tp2pp2"])
def test_dry_run_estimate_matches_measured_rss(assets, tmp_path, monkeypatch, tp, pp, nproc):
    from dms_megatron.config import RefitConfig
    from dms_megatron.launch.dry_run import estimate

    d = refit_dict(assets, steps=STEPS, seq_length=SEQ, save_interval=100, eval_batches=1, precision="auto")
    d["data"]["recall_eval"] = None
    d["dms"]["backend"] = "auto"
    d["parallel"] = dict(tp=tp, pp=pp)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))  # the ranks inherit it
    torchrun_harness(nproc, d, tmp_path, "--run-dir", tmp_path / "run", "--report", "--no-grads")
    mem = json.loads((tmp_path / "run" / "report.json").read_text())["memory"]
    assert all(len(v) == nproc for v in mem.values())
    base = mem["rss_before_build_bytes"]
    built = [a - b for a, b in zip(mem["rss_after_build_bytes"], base)]
    peak = [a - b for a, b in zip(mem["peak_rss_bytes"], base)]
    e = estimate(RefitConfig.from_dict(d), nproc // (tp * pp), device="cpu")
    for what, got, want in (("built", built, e.student_params + e.teacher_params + e.grads),
                            ("peak", peak, e.total)):
        table = f"{what}: measured {[round(g / MiB) for g in got]} MiB per rank, estimate {want / MiB:.0f} MiB"
        print(f"tp{tp} pp{pp} dp{nproc // (tp * pp)} {table}")
        assert abs(max(got) - want) <= TOLERANCE * want, table

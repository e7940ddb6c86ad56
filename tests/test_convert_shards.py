"""Tensor-parallel import through the real path (ranks started by the CLI, each streaming only its shard of the HF
tensors into its megatron model) and the shard rule megatron's SwiGLU layout needs."""

import pytest
import torch

from convert_fixtures import HF_DIVISIBLE_BY, make_hf_model, save_hf_model
from test_convert_roundtrip import _assert_byte_identical, _run_cli

from dms_megatron.convert.mapping import TP_GATED, TP_ROWS, tp_shard


def test_gated_fc1_shard_holds_its_gate_and_up_rows():
    """megatron's SwiGLU fc1 on tp rank r is [gate_r; up_r], not a contiguous slice of [gate; up]."""
    fc1 = torch.arange(8.0)[:, None]  # gate rows 0..3, up rows 4..7
    assert tp_shard(fc1, TP_GATED, 2, 0).flatten().tolist() == [0, 1, 4, 5]
    assert tp_shard(fc1, TP_GATED, 2, 1).flatten().tolist() == [2, 3, 6, 7]
    assert tp_shard(fc1, TP_ROWS, 2, 1).flatten().tolist() == [4, 5, 6, 7]


@pytest.mark.parallel
def test_import_at_tp2_round_trips_through_tp1_export(tmp_path):
    """``dms-convert import --tp 2`` relaunches itself with 2 ranks; exporting the result at tp=1 (dist-checkpoint
    resharding) gives back the original tensors byte for byte. The vocabulary pads differently at the two layouts
    (Megatron-LM's multiple of divisible_by * tp: 130 -> 256 rows at tp 2, 192 at tp 1), and the ranks' differing
    RNG states are no warning flood."""
    from megatron.core import dist_checkpointing

    save_hf_model(make_hf_model("llama", vocab_size=130), tmp_path / "hf")
    r = _run_cli("import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "meg"), "--tp", "2",
                 "--make-vocab-size-divisible-by", str(HF_DIVISIBLE_BY))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "differs from rank 0" not in r.stderr
    shapes = {k: v.global_shape for k, v in
              dist_checkpointing.load_tensors_metadata(str(tmp_path / "meg" / "iter_0000000")).items()}
    assert shapes["embedding.word_embeddings.weight"] == shapes["output_layer.weight"] == (256, 64)
    r = _run_cli("export", "--megatron-path", str(tmp_path / "meg"), "--hf-path", str(tmp_path / "out"),
                 "--format", "plain")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_byte_identical(tmp_path / "hf", tmp_path / "out")

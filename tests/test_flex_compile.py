"""No compile cliff for the flex backend: lengths are bucketed, compiled graphs are bounded, going past the limit
raises instead of running flex eagerly (which materialises L x L scores).

  python -m pytest tests/test_flex_compile.py      # ~15-40 s on 2 CPU cores (one CPU compile of flex)
"""

from __future__ import annotations

import pytest
import torch

from dms_megatron.core import flex_dms
from dms_megatron.core.dense_dms import dense_dms_attention
from dms_megatron.core.flex_dms import flex_bucket, flex_dms_attention
from attention_inputs import random_qkvz


def test_flex_bucket_values():
    assert [flex_bucket(n) for n in (1, 127, 128, 129, 256, 257, 300, 385, 4096, 4097, 6145, 32768)] == \
        [128, 128, 128, 256, 256, 384, 384, 512, 4096, 6144, 8192, 32768]
    sizes = [flex_bucket(n) for n in range(1, 131073)]
    assert all(s >= n and s % 128 == 0 and (n <= 256 or s <= 1.5 * n) for n, s in enumerate(sizes, 1))
    assert sizes == sorted(sizes) and len(set(sizes)) == 20
    with pytest.raises(ValueError, match=">= 1"):
        flex_bucket(0)


def _inputs(b, np_, ng, sq, sk, hn=16, seed=0):
    return random_qkvz(b, np_, ng, sq, sk, hn, seed)


# 10 distinct (sq, sk, window) through the compiled backend: all in the 128 bucket -> one graph
SHAPES = [(5, 5, 2), (17, 17, 3), (40, 40, 7), (64, 64, 0), (100, 100, 9), (127, 127, 30), (128, 128, 7),
          (3, 90, 4), (50, 120, 11), (1, 128, 5)]


def test_many_lengths_one_compiled_graph_equal_to_dense(monkeypatch):
    monkeypatch.setattr(flex_dms, "_FLEX_GRAPHS", set())
    unique = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for i, (sq, sk, w) in enumerate(SHAPES):
            q, k, v, z = _inputs(1, 4, 2, sq, sk, seed=i)
            for hard in (False, True):
                got = flex_dms_attention(q, k, v, z, w, hard=hard, compiled=True)
                assert got.shape == q.shape
                assert (got - dense_dms_attention(q, k, v, z, w, hard=hard)).abs().max() <= 1e-5, (sq, sk, w, hard)
    assert len(flex_dms._FLEX_GRAPHS) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - unique <= 1


def test_one_shape_past_the_recompile_limit_raises(monkeypatch):
    monkeypatch.setattr(flex_dms, "_FLEX_GRAPHS", {("already", i) for i in range(3)})
    q, k, v, z = _inputs(1, 2, 1, 200, 200)
    with torch._dynamo.config.patch(recompile_limit=3), torch.no_grad(), \
            pytest.raises(RuntimeError, match="recompile_limit=3"):
        flex_dms_attention(q, k, v, z, 4, compiled=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eager_flex_on_cuda_raises():
    q, k, v, z = (t.cuda() for t in _inputs(1, 2, 1, 64, 64))
    with pytest.raises(ValueError, match="compiled=True"):
        flex_dms_attention(q, k, v, z, 4, compiled=False)

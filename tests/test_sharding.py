"""tp=1 SwiGLU fc1 stored as one ShardedTensor: same global tensor as megatron's gate/up factory, both directions."""

import pytest
import torch

from conftest import tiny_model_config


def _model(seed):
    from dms_megatron.megatron.model import build_gpt_model

    torch.manual_seed(seed)
    return build_gpt_model(tiny_model_config(), None, seq_length=64)


def test_merged_fc1_describes_the_factory_global_tensor(megatron_single):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from dms_megatron.megatron.sharding import merge_swiglu_factories

    m = _model(0)
    factories = {k: v for k, v in m.sharded_state_dict().items() if isinstance(v, ShardedTensorFactory)}
    assert factories and all("linear_fc1" in k for k in factories)
    merged = merge_swiglu_factories(m.sharded_state_dict())
    for name, f in factories.items():
        gate, up = f.build_fn(f.key, f.data, f.replica_id, f.flattened_range)
        st = merged[name]
        assert isinstance(st, ShardedTensor) and st.key == gate.key
        assert st.global_shape == gate.global_shape and st.global_offset == gate.global_offset
        assert st.data.data_ptr() == f.data.data_ptr()  # the parameter itself, no copy
        # gate then up, each exactly where the factory puts it in the global tensor
        ffn = gate.local_shape[0]
        assert torch.equal(st.data[:ffn], gate.data) and torch.equal(st.data[ffn:], up.data)
        assert up.global_offset[1] == gate.global_offset[1] + ffn


@pytest.mark.parametrize("save_merged,load_merged", [(True, False), (False, True)])
def test_checkpoints_cross_load_between_merged_and_factory_layouts(megatron_single, tmp_path, save_merged,
                                                                   load_merged):
    from megatron.core import dist_checkpointing

    from dms_megatron.megatron.sharding import merge_swiglu_factories
    from dms_megatron.checkpoint.store import _use_results_queue

    _use_results_queue(in_background=False)
    src, dst = _model(0), _model(1)
    sd = src.sharded_state_dict()
    dist_checkpointing.save(merge_swiglu_factories(sd) if save_merged else sd, str(tmp_path))
    sd = dst.sharded_state_dict()
    loaded = dist_checkpointing.load(merge_swiglu_factories(sd) if load_merged else sd, str(tmp_path),
                                     strict="raise_all")
    dst.load_state_dict(loaded, strict=False)
    a, b = src.state_dict(), dst.state_dict()
    tensors = [k for k, v in a.items() if torch.is_tensor(v) and not k.endswith("_extra_state")]
    assert any("linear_fc1" in k for k in tensors)
    for k in tensors:
        assert torch.equal(a[k], b[k]), k

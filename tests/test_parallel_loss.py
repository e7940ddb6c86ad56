"""Vocabulary-parallel KL against the full-vocabulary ``kd_loss`` (2 gloo ranks), the pipeline message packing, and
layout errors raised before any process group exists."""

import os

import pytest
import torch

from spawn_util import spawn_and_collect

V, VOCAB = 12, 10  # padded vocabulary 12 (6 per rank), real vocabulary 10: rank 1 holds 2 padding ids


def _kl_worker(rank, world, port, out):
    import torch.distributed as dist

    from dms_megatron.megatron.parallel_loss import vocab_parallel_kd_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 3
    t_full = torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 3
    s_full[..., VOCAB:] = 1e4  # padding logits must not count (huge values would dominate if they did)
    t_full[..., VOCAB:] = -1e4
    mask = (torch.rand(3, 5, generator=g) > 0.3).double()
    v = V // world
    res = {}
    for direction in ("student_teacher", "teacher_student"):
        s = s_full[..., rank * v:(rank + 1) * v].clone().requires_grad_(True)
        t = t_full[..., rank * v:(rank + 1) * v].clone()
        loss = vocab_parallel_kd_loss(s, t, VOCAB, mask, direction, group=group)
        loss.backward()
        res[direction] = (float(loss), s.grad.clone())
    out.put((rank, res))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parallel
def test_vocab_parallel_kl_matches_full_vocab_loss_and_gradient():
    from dms_megatron.core.losses import kd_loss

    got = spawn_and_collect(_kl_worker, 2, timeout=240)
    g = torch.Generator().manual_seed(0)
    s_full = torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 3
    t_full = torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(3, 5, generator=g) > 0.3).double()
    for direction in ("student_teacher", "teacher_student"):
        s = s_full[..., :VOCAB].clone().requires_grad_(True)
        ref = kd_loss(s, t_full[..., :VOCAB], mask, direction)
        ref.backward()
        grad = torch.cat([got[0][direction][1], got[1][direction][1]], dim=-1)
        for r in (0, 1):
            assert got[r][direction][0] == pytest.approx(float(ref.detach()), rel=1e-6)
        assert torch.allclose(grad[..., :VOCAB], s.grad.double(), rtol=1e-5, atol=1e-7), direction
        assert float(grad[..., VOCAB:].abs().max()) == 0.0


def _argmax_logits():
    """[4, 5, V] float32 logits with crafted ties: within a shard, across the two shards, with padding ids (>= VOCAB)
    holding the largest values, and all-equal rows."""
    x = torch.randn(4, 5, V, generator=torch.Generator().manual_seed(1))
    x[..., VOCAB:] = 1e4  # padding must never win
    x[0, 0, :] = 0.0
    x[0, 0, [2, 4]] = 7.0  # tie inside rank 0's shard: 2
    x[0, 1, :] = 0.0
    x[0, 1, [3, 8]] = 7.0  # tie across shards (ids 3 on rank 0, 8 on rank 1): 3
    x[0, 2, :] = 0.0
    x[0, 2, [7, 9]] = 7.0  # tie inside rank 1's shard: 7
    x[0, 3, :VOCAB] = -2.0  # every real id tied: 0
    x[0, 4, :] = 0.0
    x[0, 4, 9] = 5.0  # the best real id is the last one before the padding
    return x


def _argmax_worker(rank, world, port, out):
    import torch.distributed as dist

    from dms_megatron.megatron.parallel_loss import vocab_parallel_argmax

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    v = V // world
    out.put((rank, vocab_parallel_argmax(_argmax_logits()[..., rank * v:(rank + 1) * v], VOCAB, group=group)))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parallel
def test_vocab_parallel_argmax_matches_full_vocab_argmax_with_ties():
    got = spawn_and_collect(_argmax_worker, 2, timeout=240)
    x = _argmax_logits()
    ref = x[..., :VOCAB].argmax(-1)  # the first (lowest) id among ties
    assert ref[0].tolist() == [2, 3, 7, 0, 9]  # the crafted ties resolve as intended
    assert torch.equal(got[0], ref) and torch.equal(got[1], ref)


def test_pipeline_message_carries_fraction_sums_and_their_gradient():
    from dms_megatron.megatron.parallel_loss import pack_stage_output, unpack_stage_input

    hidden = torch.randn(4, 6, 8, requires_grad=True)  # student 3 + teacher 3
    carry = torch.tensor([0.25, 0.5, 1.0], requires_grad=True)
    msg = pack_stage_output(hidden, carry)
    assert msg.shape == (4, 7, 8)
    h, c = unpack_stage_input(msg, 3)
    assert torch.equal(h, hidden) and torch.equal(c, carry)
    (c * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(carry.grad, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("tp,pp,world,needle", [
    (4, 1, 4, "parallel.tp=4 does not divide model.num_attention_heads (query heads)=6"),
    (3, 1, 3, "parallel.tp=3 does not divide model.num_query_groups (KV heads)=2"),
    (2, 3, 6, "parallel.pp=3 does not divide model.num_layers=4"),
    (2, 2, 6, "world size 6 is not a multiple of parallel.tp * parallel.pp = 2 * 2 = 4"),
])
def test_bad_layouts_fail_in_one_line_without_process_groups(tp, pp, world, needle):
    import torch.distributed as dist

    from dms_megatron.config import TINY_TEACHER, ModelConfig
    from dms_megatron.megatron.distributed import validate_model_layout

    was = dist.is_initialized()
    mc = TINY_TEACHER  # 4 layers, hidden 192, ffn 512, 6 heads, 2 KV heads
    with pytest.raises(ValueError) as e:
        validate_model_layout(mc, tp, pp, world)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert dist.is_initialized() == was
    mc = ModelConfig(family="llama", kv_channels=None, vocab_size=1024, max_position_embeddings=256,
                     tie_embeddings=False, num_layers=4, hidden_size=256,
                     ffn_hidden_size=500, num_attention_heads=8, num_query_groups=8)
    with pytest.raises(ValueError, match="model.ffn_hidden_size=500"):
        validate_model_layout(mc, 8, 1, 8)
    assert validate_model_layout(TINY_TEACHER, 2, 2, 8) == 2

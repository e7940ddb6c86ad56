"""Checkpoint API: exact round trip of model/optimizer/scheduler/RNG, atomic writes, refusal of partial or corrupt
checkpoints, stock-checkpoint -> DMS-adapter student initialisation, teacher sanity check."""

import pytest
import torch

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model_config

MICRO_BATCH = 2
SAVE_AT = 2
SEED_A, SEED_B = 0, 1


def _setup(dms_cfg=None, seed=SEED_A, adapter_only=False, steps=10):
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.config import TrainConfig
    from dms_megatron.training.optim import build_optimizer, build_scheduler, wrap_ddp

    torch.manual_seed(seed)
    model = build_gpt_model(tiny_model_config(), dms_cfg, seq_length=TINY_SEQ)
    if adapter_only:
        for n, p in model.named_parameters():
            p.requires_grad_("dms_alpha" in n)
    t_cfg = TrainConfig(steps=steps, micro_batch_size=MICRO_BATCH, global_batch_size=MICRO_BATCH,
                        seq_length=TINY_SEQ, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1)
    ddp = wrap_ddp(model)
    opt = build_optimizer(ddp, t_cfg)
    return model, ddp, opt, build_scheduler(opt, t_cfg)


def _step(model, ddp, opt, sched, step):
    """One optimizer step on a fixed synthetic batch (drawn from the global torch RNG, so RNG state matters)."""
    from dms_megatron.megatron.compat import cuda_to_cpu_mode
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    vocab = model.model_config.vocab_size
    ids = torch.randint(0, vocab, (MICRO_BATCH, TINY_SEQ))
    pos = torch.arange(TINY_SEQ)[None].expand(MICRO_BATCH, -1)
    rt = DMSRuntime(mode="train", step=step)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    with dms_forward(model, rt):
        logits = ddp(ids, pos, None)[..., :vocab]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    if rt.fractions:
        loss = loss + (0.5 - rt.mean_fraction()).clamp(min=0).mean()
    loss.backward()
    ddp.finish_grad_sync()
    with cuda_to_cpu_mode():
        opt.step()
    sched.step(1)
    return float(loss.detach())


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("adapter_only", [False, True])
def test_roundtrip_restores_training_state_exactly(megatron_single, tmp_path, adapter_only):
    from dms_megatron.config import DMSConfig
    from dms_megatron.checkpoint import TRACKER, load_checkpoint, save_checkpoint

    dms = DMSConfig(window=4, alpha_source="adapter")
    model, ddp, opt, sched = _setup(dms, adapter_only=adapter_only)
    for s in range(SAVE_AT):
        _step(model, ddp, opt, sched, s)
    extra = {"data_position": SAVE_AT * MICRO_BATCH, "note": "x"}
    final = save_checkpoint(tmp_path, SAVE_AT, ddp, opt, sched, extra=extra)
    assert final.name == "iter_0000002" and (tmp_path / TRACKER).read_text() == "2"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    cont = [_step(model, ddp, opt, sched, s) for s in range(SAVE_AT, SAVE_AT + 2)]
    expected = _params(model)

    model2, ddp2, opt2, sched2 = _setup(dms, seed=SEED_B, adapter_only=adapter_only)
    torch.manual_seed(SEED_B + 100)  # scramble the RNG: the checkpoint must restore it
    it, got_extra = load_checkpoint(tmp_path, ddp2, opt2, sched2)
    assert it == SAVE_AT and got_extra == extra
    assert sched2.num_steps == SAVE_AT
    resumed = [_step(model2, ddp2, opt2, sched2, s) for s in range(SAVE_AT, SAVE_AT + 2)]
    assert resumed == cont
    for n, p in _params(model2).items():
        assert torch.equal(p, expected[n]), n


def test_failed_save_leaves_previous_checkpoint_current(megatron_single, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from dms_megatron.checkpoint import TRACKER, CheckpointError, latest_iteration, load_checkpoint, save_checkpoint

    model, ddp, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, ddp, opt, sched)
    before = _params(model)
    _step(model, ddp, opt, sched, 1)
    real_save = dist_checkpointing.save

    def crash_after_writing(state, path, *a, **k):
        real_save(state, path, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(dist_checkpointing, "save", crash_after_writing)
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*iter_0000002 failed: OSError: disk full"):
        save_checkpoint(tmp_path, 2, ddp, opt, sched)
    monkeypatch.undo()
    assert not (tmp_path / "iter_0000002").exists()
    assert latest_iteration(tmp_path) == 1 and (tmp_path / TRACKER).read_text() == "1"
    model2, ddp2, opt2, sched2 = _setup(seed=SEED_B)
    assert load_checkpoint(tmp_path, ddp2, opt2, sched2)[0] == 1
    assert all(torch.equal(p, before[n]) for n, p in _params(model2).items())
    # a later save of the same iteration replaces the leftover temporary directory
    save_checkpoint(tmp_path, 2, ddp, opt, sched)
    assert latest_iteration(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_partial_or_corrupt_checkpoints_are_refused(megatron_single, tmp_path):
    from dms_megatron.checkpoint import TRACKER, CheckpointError, load_checkpoint, \
        load_model_weights, save_checkpoint

    model, ddp, opt, sched = _setup()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", ddp)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "empty", ddp)
    save_checkpoint(tmp_path / "a", 3, ddp, opt, sched)
    with pytest.raises(CheckpointError, match="iter_0000004 does not exist"):
        load_checkpoint(tmp_path / "a", ddp, iteration=4)
    (tmp_path / "a" / TRACKER).write_text("3\x00\x00")
    with pytest.raises(CheckpointError, match="is corrupt: expected an iteration number"):
        load_checkpoint(tmp_path / "a", ddp)
    (tmp_path / "a" / TRACKER).write_text("3")
    common = tmp_path / "a" / "iter_0000003" / "common.pt"
    common.write_bytes(common.read_bytes()[:20])  # truncated
    with pytest.raises(CheckpointError, match="is corrupt: cannot read its common state"):
        load_checkpoint(tmp_path / "a", ddp, opt, sched)
    common.unlink()
    with pytest.raises(CheckpointError, match="partial or corrupt: common.pt is missing"):
        load_model_weights(tmp_path / "a", model)


def test_stock_checkpoint_initialises_adapter_student(megatron_single, tmp_path):
    from dms_megatron.config import DMSConfig
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.checkpoint import CheckpointError, load_model_weights, save_checkpoint

    torch.manual_seed(SEED_A)
    stock = build_gpt_model(tiny_model_config(), None, seq_length=TINY_SEQ)
    save_checkpoint(tmp_path, 0, stock)
    torch.manual_seed(SEED_B)
    student = build_gpt_model(tiny_model_config(), DMSConfig(window=4, alpha_source="adapter"),
                              seq_length=TINY_SEQ)
    with pytest.raises(CheckpointError, match="dms_alpha"):
        load_model_weights(tmp_path, student)  # strict by default: the adapter is not in a stock checkpoint
    skipped = load_model_weights(tmp_path, student, allow_missing=("dms_alpha",))
    expected_skipped = {f"decoder.layers.{i}.self_attention.dms_alpha_{k}.weight"
                        for i in range(tiny_model_config().num_layers) for k in ("norm", "proj")}
    assert set(skipped) == expected_skipped
    ref = dict(stock.named_parameters())
    for n, p in student.named_parameters():
        if n not in expected_skipped:
            assert torch.equal(p, ref[n]), n
    wider = build_gpt_model(tiny_model_config(ffn_hidden_size=2 * tiny_model_config().ffn_hidden_size), None,
                            seq_length=TINY_SEQ)
    with pytest.raises(CheckpointError, match="shape mismatch .*linear_fc1.weight"):
        load_model_weights(tmp_path, wider)


def test_teacher_sanity_check_rejects_empty_or_nonfinite_weights(megatron_single):
    from dms_megatron.config import ConfigError
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.training.weights import check_teacher

    mc = tiny_model_config(vocab_size=TINY_VOCAB - 5)  # padded: the last rows are padding
    model = build_gpt_model(mc, None, seq_length=TINY_SEQ)
    emb = model.embedding.word_embeddings
    assert emb.weight.shape[0] > mc.vocab_size
    check_teacher(model, mc.vocab_size)
    with torch.no_grad():
        emb.weight[:mc.vocab_size].zero_()  # the real rows empty, the padding rows not: still empty
    with pytest.raises(ConfigError, match="constant after loading"):
        check_teacher(model, mc.vocab_size)
    # a tensor-parallel rank whose vocabulary shard is all padding (zeros) cannot tell: no error
    emb.vocab_start_index = mc.vocab_size
    with torch.no_grad():
        emb.weight.zero_()
    check_teacher(model, mc.vocab_size)
    emb.vocab_start_index = 0
    with torch.no_grad():
        emb.weight.normal_()
        model.output_layer.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="output_layer.weight has NaN/inf"):
        check_teacher(model, mc.vocab_size)

"""Background (async) checkpoint saves: a run resumed from an async save is bit-identical to one resumed from a
synchronous save of the same state, and a save that never finalizes (killed) or fails in its writer process never
becomes ``latest``; the previous checkpoint stays loadable."""

import pytest
import torch

from test_checkpointing import SAVE_AT, SEED_B, _params, _setup, _step


def _resume_two_steps(ckpt):
    from dms_megatron.checkpoint import load_checkpoint

    model, ddp, opt, sched = _setup(seed=SEED_B)
    torch.manual_seed(SEED_B + 100)  # scramble the RNG: the checkpoint restores it
    assert load_checkpoint(ckpt, ddp, opt, sched)[0] == SAVE_AT
    losses = [_step(model, ddp, opt, sched, s) for s in range(SAVE_AT, SAVE_AT + 2)]
    return losses, _params(model)


def test_async_save_resumes_bit_identically_to_a_sync_save(megatron_single, tmp_path):
    from dms_megatron.checkpoint import AsyncSaves, latest_iteration, save_checkpoint

    model, ddp, opt, sched = _setup()
    for s in range(SAVE_AT):
        _step(model, ddp, opt, sched, s)
    rng = torch.get_rng_state()
    save_checkpoint(tmp_path / "sync", SAVE_AT, ddp, opt, sched)
    saves = AsyncSaves()
    torch.set_rng_state(rng)
    save_checkpoint(tmp_path / "async", SAVE_AT, ddp, opt, sched, async_saves=saves)
    _step(model, ddp, opt, sched, SAVE_AT)  # training goes on while the write runs: it must not leak into the save
    saves.finalize(blocking=True)
    assert latest_iteration(tmp_path / "async") == SAVE_AT and saves.pending() == 0
    sync_losses, sync_params = _resume_two_steps(tmp_path / "sync")
    async_losses, async_params = _resume_two_steps(tmp_path / "async")
    assert async_losses == sync_losses
    for n, p in async_params.items():
        assert torch.equal(p, sync_params[n]), n


def test_unfinalized_or_failed_async_save_never_becomes_latest(megatron_single, tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from dms_megatron.checkpoint import AsyncSaves, CheckpointError, latest_iteration, load_checkpoint, save_checkpoint

    model, ddp, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, ddp, opt, sched)
    before = _params(model)
    for s in (1, 2):  # the first step runs at warm-up LR 0
        _step(model, ddp, opt, sched, s)
    saves = AsyncSaves()
    save_checkpoint(tmp_path, 2, ddp, opt, sched, async_saves=saves)
    # the trainer dies here (no finalize): the write is a temporary directory, iteration 1 stays latest
    assert latest_iteration(tmp_path) == 1 and not (tmp_path / "iter_0000002").exists()
    saves.finalize(blocking=True)
    assert latest_iteration(tmp_path) == 2

    real_write = filesystem_async._write_item
    written = []

    def write_then_fail(*a, **k):  # the writer process dies half-way through its file
        if written:
            raise OSError("disk full")
        written.append(real_write(*a, **k))
        return written[-1]

    monkeypatch.setattr(filesystem_async, "_write_item", write_then_fail)
    save_checkpoint(tmp_path, 3, ddp, opt, sched, async_saves=saves)
    with pytest.raises(CheckpointError, match=r"iter_0000003 in the background failed"):
        saves.finalize(blocking=True)
    monkeypatch.undo()
    assert latest_iteration(tmp_path) == 2 and not (tmp_path / "iter_0000003").exists()
    assert not list(tmp_path.glob(".tmp*"))
    model2, ddp2, opt2, sched2 = _setup(seed=SEED_B)
    assert load_checkpoint(tmp_path, ddp2, opt2, sched2)[0] == 2
    assert any(not torch.equal(p, before[n]) for n, p in _params(model2).items())  # iteration 2's weights, not 1's

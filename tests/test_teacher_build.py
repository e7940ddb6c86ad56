"""The tiny teacher's pre-training: the curriculum's batches (shapes, answer weights, where examples sit), a build
that is bit-reproducible from its seed, and the shipped assets' integrity check."""

import hashlib
import shutil

import pytest
import torch

from dms_megatron.data.tokenizer import KV


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from dms_megatron.data.corpus import stdlib_texts
    from dms_megatron.data.tokenizer import train_tokenizer

    return train_tokenizer(list(stdlib_texts(150_000, chunk_chars=1000)), 400, tmp_path_factory.mktemp("tok"))


def _answers(weights):
    return [(r, c) for r, c in zip(*torch.nonzero(weights > 1, as_tuple=True))]


def test_curriculum_batches(tok):
    from dms_megatron.training.pretrain import PretrainBatches, PretrainRecipe, phase_at

    recipe = PretrainRecipe(phases=((2, 32, 8, 0.0), (4, 64, 4, 0.5)), seq_length=128, batch_size=2,
                            answer_weight=8.0)
    assert [phase_at(recipe, s) for s in (0, 1, 2, 3, 4, 99)] == [(32, 8, 0.0)] * 2 + [(64, 4, 0.5)] * 2 + \
        [(128, 2, None)] * 2
    text = list(range(60, 380))
    batches = PretrainBatches(tok, text, recipe)
    kv = tok.convert_tokens_to_ids(KV)
    first = batches.batch(0)
    assert first["tokens"].shape == (8, 32) and first["weights"].shape == (8, 32)
    assert torch.equal(first["labels"][:, :-1], first["tokens"][:, 1:])
    for row in first["tokens"].tolist():  # short phases: every sequence is a recall example placed at its start
        assert kv in row[:3]
    for r, c in _answers(first["weights"]):  # position c predicts an answer: the token after "<|q|> key"
        assert first["weights"][r, c] == 8.0 and first["tokens"][r, c - 1] == batches.tasks["mqar"].q
    full = [batches.batch(s) for s in range(4, 40)]
    assert all(b["tokens"].shape == (2, 128) for b in full)
    rows = [(b["tokens"][i].tolist(), b["weights"][i]) for b in full for i in range(2)]
    plain = [r for r, w in rows if not bool((w > 1).any())]
    placed = {r.index(kv) for r, w in rows if kv in r}
    assert plain and len(placed) > 5  # the full task mixes in plain text and places examples anywhere
    again = PretrainBatches(tok, text, recipe)
    assert all(torch.equal(a["tokens"], again.batch(i)["tokens"]) for i, a in enumerate([first]))  # seeded


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_short_build_is_bit_reproducible_and_verified(tmp_path, monkeypatch, megatron_single):
    """Two builds from the same recipe write identical weights; the checksum file catches a damaged or missing
    file with a one-line error naming the tool that rebuilds it."""
    import dms_megatron.training.teacher_build as tb
    from dms_megatron.data.embedded import AssetError, verify_teacher
    from dms_megatron.training.pretrain import PretrainRecipe

    monkeypatch.setattr(tb, "TEXT_CHARS", 200_000)
    monkeypatch.setattr(tb, "HELDOUT_CHARS", 60_000)
    recipe = PretrainRecipe(steps=3, phases=((1, 32, 4, 0.0),), batch_size=2)
    outs = []
    for name in ("a", "b"):
        rec = tb.build_teacher_assets(tmp_path / name, recipe, torch.device("cpu"), log=lambda m: None, eval_items=4)
        outs.append(tmp_path / name)
        assert rec["final"]["step"] == 3 and "recall_mqar" in rec["final"]
    assert _digest(outs[0] / "model.safetensors") == _digest(outs[1] / "model.safetensors")
    assert verify_teacher(outs[0]) == outs[0]
    (outs[0] / "model.safetensors").write_bytes(b"x" + (outs[0] / "model.safetensors").read_bytes()[1:])
    with pytest.raises(AssetError, match=r"model.safetensors does not match its checksum.*tools/build_tiny_teacher"):
        verify_teacher(outs[0])
    shutil.rmtree(outs[1] / "heldout")
    with pytest.raises(AssetError, match=r"incomplete: .*heldout/.* is missing; rebuild it with python tools/"):
        verify_teacher(outs[1])
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_stopping_the_teacher_build_is_one_line_and_writes_nothing(tmp_path, sig):
    """Ctrl-C (or SIGTERM) while tools/build_tiny_teacher.py pre-trains: exit 130, one line, no partial assets."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # the child first does what Python does when started in a terminal's foreground: Ctrl-C raises
    # KeyboardInterrupt (a test run started in the background inherits SIGINT ignored)
    small = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "import sys; sys.path.insert(0, sys.argv.pop(1)); import dms_megatron.training.teacher_build as tb; "
             "tb.TEXT_CHARS, tb.HELDOUT_CHARS = 200_000, 60_000; import build_tiny_teacher as b; "
             "sys.exit(b.main(sys.argv[1:]))")
    out = tmp_path / "teacher"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", small, str(root / "tools"), "--out", str(out), "--steps",
                             "100000"], env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "pre-training 100000 steps" in line:
            break
    proc.send_signal(getattr(signal, sig))
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the build did not stop within 300 s of {sig}; its stderr: {err[-3000:]}")
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == [f"[teacher] interrupted: nothing written to {out}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_signals_deferred_arrive_when_the_setup_block_ends():
    """A Ctrl-C during process-group setup waits for the block's end (the setup completes), then interrupts."""
    import os
    import signal
    import time

    from dms_megatron.progress import signals_deferred

    done, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("setup finished")
        done.append("after the block")
    assert done == ["setup finished"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is back


def test_a_stopped_pretraining_resumes_to_the_same_weights(tok, tmp_path, megatron_single):
    """With a progress file, a pre-training stopped after an evaluation and run again ends with the weights of the
    uninterrupted run, bit for bit; a progress file of another recipe is refused."""
    from dms_megatron.megatron.distributed import init_process_groups
    from dms_megatron.training.pretrain import PretrainRecipe, ProgressMismatch, pretrain

    init_process_groups(1, 1, seed=1234)  # (again: a teacher build of an earlier test tears its groups down)
    recipe = PretrainRecipe(steps=4, phases=((2, 32, 4, 0.0),), batch_size=2, seq_length=64, warmup_steps=1)
    text = list(range(60, 380))
    cpu = torch.device("cpu")
    whole, _ = pretrain(recipe, tok, text, {}, cpu, log=lambda m: None, eval_interval=2)

    def stop_after_first_evaluation(msg):
        if msg.startswith("step 2 "):
            raise KeyboardInterrupt

    progress = tmp_path / "progress.pt"
    with pytest.raises(KeyboardInterrupt):
        pretrain(recipe, tok, text, {}, cpu, log=stop_after_first_evaluation, eval_interval=2, progress=progress)
    lines = []
    resumed, history = pretrain(recipe, tok, text, {}, cpu, log=lines.append, eval_interval=2, progress=progress)
    assert lines[0] == f"resuming from {progress} after 2 steps" and [h["step"] for h in history] == [2, 4]
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    other = PretrainRecipe(steps=5, phases=((2, 32, 4, 0.0),), batch_size=2, seq_length=64, warmup_steps=1)
    with pytest.raises(ProgressMismatch, match="progress of another recipe"):
        pretrain(other, tok, text, {}, cpu, log=lambda m: None, eval_interval=2, progress=progress)

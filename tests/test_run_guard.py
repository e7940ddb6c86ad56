"""A run dir guards its identity and a batch host checks before anything starts: resume refuses a changed run and
never overwrites its config; --prepare-only catches bad input and leaves no run dir; the README's presets prepare."""

import pytest
import yaml

from cli_helpers import one_error_line, refit, refit_overrides, steps
from refit_fixtures import shared_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def test_resume_refuses_a_changed_run_and_never_overwrites_its_config(assets, tmp_path):
    run = tmp_path / "run"
    first = refit(refit_overrides(assets, steps=2) + [f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run / "config.yaml").read_text()
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    assert run / ".hydra" / "overrides.yaml" in kept
    line = one_error_line(refit(refit_overrides(assets, steps=3) + ["dms.window=8", f"hydra.run.dir={run}"]))
    assert "dms.window: 4 -> 8" in line and "train.steps: 2 -> 3" in line and "new run dir" in line
    line = one_error_line(refit(refit_overrides(assets, steps=3) + [f"hydra.run.dir={run}"]))
    assert "resume.allow_changes" in line
    line = one_error_line(refit(refit_overrides(assets, steps=2) + ["dms.window=8", "resume.allow_changes=[dms.window]",
                                                                 f"hydra.run.dir={run}"]))
    assert "may only name train.steps" in line
    assert (run / "config.yaml").read_text() == before and steps(run) == [1, 2]
    # the refused re-runs left the run as it was: Hydra's .hydra/ record and the log untouched, nothing added
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts} == kept
    ok = refit(refit_overrides(assets, steps=3) + ["resume.allow_changes=[train.steps]", f"hydra.run.dir={run}"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "resume: train.steps 2 -> 3 (allowed by resume.allow_changes)" in ok.stdout
    assert (run / "config.prev-1.yaml").read_text() == before and steps(run) == [1, 2, 3]


@pytest.mark.parametrize("change,needle", [
    ({"train.init_checkpoint": "/nowhere/ckpt"}, "train.init_checkpoint /nowhere/ckpt does not exist"),
    ({"data.train_prefix": "/nowhere/train"}, "/nowhere/train.bin does not exist"),
    ({"data.tokenizer": "/nowhere/tok"}, "tokenizer directory /nowhere/tok does not exist"),
    ({"parallel.nproc_per_node": 2, "train.micro_batch_size": 4},
     "train.global_batch_size=4 must be a multiple of train.micro_batch_size * data-parallel size = 4 * 2"),
    ({"train.seq_length": 128, "model.max_position_embeddings": 128},
     "train.seq_length=128 exceeds the teacher's max_position_embeddings=64"),
])
def test_prepare_only_catches_bad_input_before_anything_is_written(assets, tmp_path, change, needle):
    args = [a for a in refit_overrides(assets) if a.split("=")[0] not in change]
    r = refit(["--prepare-only", *args, *(f"{k}={v}" for k, v in change.items()), f"hydra.run.dir={tmp_path / 'r'}"])
    assert needle in one_error_line(r)
    assert not (tmp_path / "r").exists()  # no run dir at all: no config.yaml, no .hydra/, no log


def test_readme_data_parallel_preset_prepares(tmp_path):
    """`dms-refit parallel=dp2` exactly as the README writes it: the preset alone must fit the default batch."""
    r = refit(["--prepare-only", "parallel=dp2", f"hydra.run.dir={tmp_path / 'r'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    t = cfg["train"]
    assert cfg["parallel"]["nproc_per_node"] == 2 and t["global_batch_size"] % (t["micro_batch_size"] * 2) == 0


def test_the_default_embedded_run_prepares(tmp_path):
    """The shipped teacher, its held-out items and the default config pass every pre-flight check."""
    r = refit(["--prepare-only", f"hydra.run.dir={tmp_path / 'r'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert cfg["embedded"] is True and cfg["data"]["recall"] == "mqar"

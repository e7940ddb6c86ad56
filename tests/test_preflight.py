"""Checks run once per launch: a `dms-refit` launch (run in this process) resolves its inputs and checks its layout
once per job, whoever needs them after (the trainer, the report stage, the local ranks) takes the pre-flight's
result, also through its record in the run dir; a batch job of another size gets its own layout check."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from cli_helpers import refit_overrides
from refit_fixtures import shared_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


@pytest.fixture
def launch(monkeypatch):
    """``launch(args)``: `dms-refit ARGS` in this process; returns how often the run's inputs were resolved and its
    layout checked (every resolution goes through RunInputs._resolve, every layout check through the pre-flight's
    validate_model_layout)."""
    from dms_megatron.launch import refit
    from dms_megatron.training import preflight
    from dms_megatron.training.inputs import RunInputs

    counts = Counter()
    resolve, layout = RunInputs._resolve.__func__, preflight.validate_model_layout

    def counted_resolve(cls, *a, **k):
        counts["resolve"] += 1
        return resolve(cls, *a, **k)

    def counted_layout(*a, **k):
        counts["layout"] += 1
        return layout(*a, **k)

    monkeypatch.setattr(RunInputs, "_resolve", classmethod(counted_resolve))
    monkeypatch.setattr(preflight, "validate_model_layout", counted_layout)
    monkeypatch.setattr(refit, "_prepare_only", False)
    monkeypatch.setattr(refit, "_checked", None)

    def run(args):
        monkeypatch.setattr(sys, "argv", ["dms-refit", *map(str, args)])
        refit.main()
        return dict(counts)

    return run


def test_a_prepared_run_and_each_sweep_job_resolve_once(launch, tmp_path):
    assert launch(["--prepare-only", f"hydra.run.dir={tmp_path / 'one'}"]) == {"resolve": 1, "layout": 1}
    assert (tmp_path / "one" / "config.yaml").is_file()
    counts = launch(["--prepare-only", "-m", "dms.final_cr=2,3", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert counts == {"resolve": 1 + 2, "layout": 1 + 2}  # the run above, then one per job of the two-point sweep
    assert sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/config.yaml")) == ["0", "1"]


def test_a_one_rank_launch_resolves_once_for_the_launcher_the_trainer_and_the_report(assets, launch, tmp_path):
    run = tmp_path / "run"
    args = refit_overrides(assets, steps=1, save_interval=1, eval_batches=1, recall_eval_limit=2)
    assert launch(args + [f"hydra.run.dir={run}"]) == {"resolve": 1, "layout": 1}
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 1 and report["recall_answers"] > 0  # the report stage read the held-out items too


def test_local_ranks_take_the_launchers_record_instead_of_resolving(assets, launch, tmp_path, monkeypatch):
    """Two local ranks: the launcher hands them its pre-flight as ``--inputs RUN/inputs.json``; a rank given it
    (here one, in this process, which checks only the layout of its own world size) resolves nothing."""
    from dms_megatron.launch import refit, worker

    run, started = tmp_path / "run", []

    def one_local_rank(run_dir, world, inputs=None):
        started.append((Path(run_dir), world, Path(inputs)))
        return worker.main(["--run-dir", str(run_dir), "--inputs", str(inputs)])

    monkeypatch.setattr(refit, "run_local_ranks", one_local_rank)
    args = refit_overrides(assets, steps=1, save_interval=1, eval_batches=1, recall_eval_limit=2)
    counts = launch(args + ["parallel.nproc_per_node=2", f"hydra.run.dir={run}"])
    assert started == [(run, 2, run / "inputs.json")]
    assert counts == {"resolve": 1, "layout": 1 + 1}  # the launcher's, then this rank's world of 1 (not 2)
    assert json.loads((run / "report.json").read_text())["steps"] == 1


def test_the_record_reads_back_as_the_pre_flight_and_refuses_another_config(assets, tmp_path):
    import dataclasses

    from dms_megatron.config import ConfigError, DataBlend, RefitConfig
    from dms_megatron.training.preflight import load_checked, preflight, save_checked
    from refit_fixtures import refit_dict

    d = refit_dict(assets)
    d["data"] = {"blend": [0.3, assets["train"], 0.7, assets["valid"]], "split": "90,10,0",
                 "tokenizer": assets["tokenizer"], "recall_eval": assets["recall"]}
    cfg = RefitConfig.from_dict(d)
    checked = preflight(cfg)
    assert checked.inputs.data == DataBlend(blend=([assets["train"], assets["valid"]], [0.3, 0.7]), split="90,10,0")
    assert load_checked(save_checked(checked, tmp_path / "inputs.json"), cfg) == checked
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=7))
    with pytest.raises(ConfigError, match="holds the pre-flight of another config"):
        load_checked(tmp_path / "inputs.json", other)


def test_a_batch_job_of_another_size_gets_its_own_layout_check(assets):
    """A batch job may start another number of ranks than configured: its dp, and the batch split over it, are
    checked for that world (the configured one's were checked by the config)."""
    from dms_megatron.config import ConfigError, RefitConfig
    from dms_megatron.training.preflight import preflight
    from refit_fixtures import refit_dict

    checked = preflight(RefitConfig.from_dict(refit_dict(assets, micro_batch_size=2, global_batch_size=4)))
    assert (checked.world, checked.dp) == (1, 1)
    assert checked.for_world(1) is checked
    assert checked.for_world(2).dp == 2
    with pytest.raises(ConfigError, match=r"must be a multiple of train.micro_batch_size \* data-parallel size = "
                                          r"2 \* 4"):
        checked.for_world(4)

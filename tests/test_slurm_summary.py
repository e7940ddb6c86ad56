"""dms-sweep-summary on hand-made run dirs (no cluster): finished vs partial points, CSV/JSON/PNG, exit status."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(root: Path, name: str, final_cr, window, report=None, status=None, config=True, overrides=None):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    if config:
        (d / "config.yaml").write_text(yaml.safe_dump({"dms": {"final_cr": final_cr, "window": window}}))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    if report is not None:
        (d / "report.json").write_text(json.dumps(report))
    if status is not None:
        (d / "status.json").write_text(json.dumps({"state": status, "exit_code": 0}))


def _summary(*args):
    return subprocess.run([sys.executable, "-m", "dms_megatron.launch.summary", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_summary_lists_finished_points_and_marks_partial_ones(tmp_path):
    rep = lambda cr, kl: {"achieved_cr": cr, "kept_fraction": 1 / cr, "kl_to_teacher": kl, "steps": 5,  # noqa: E731
                          "tokens_per_s": 10.0, "student_recall_acc": 0.5, "teacher_recall_acc": 0.75}
    _run_dir(tmp_path, "0", 2.0, 4, report=rep(2.1, 0.01))                      # local multirun point
    _run_dir(tmp_path, "1", 2.0, 8, status="FAILED")                            # job failed mid-run
    _run_dir(tmp_path, "2", None, None, config=False, status="FAILED",          # failed validation: no config.yaml
             overrides=["dms.final_cr=0.5", "dms.window=8"])
    _run_dir(tmp_path, "10", 4.0, 8, report=rep(3.9, 0.03), status="COMPLETED")  # batch job, finished
    _run_dir(tmp_path, "3", 4.0, 4, report=rep(4.2, 0.02), status="PREEMPTED")   # stale report, job not done
    _run_dir(tmp_path, "4", 4.0, 16)                                           # nothing written yet
    (tmp_path / ".submitit").mkdir()                                           # not a run dir
    r = _summary(tmp_path)
    assert r.returncode == 1, r.stderr
    assert "not finished: 1, 2, 3, 4" in r.stderr
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [x["run"] for x in rows] == ["0", "1", "2", "3", "4", "10"]  # numeric order
    by = {x["run"]: x for x in rows}
    assert [by[k]["state"] for k in ("0", "1", "2", "3", "4", "10")] == \
        ["FINISHED", "FAILED", "FAILED", "PREEMPTED", "INCOMPLETE", "FINISHED"]
    assert (by["0"]["final_cr"], by["0"]["window"], by["0"]["achieved_cr"], by["0"]["kl_to_teacher"]) == \
        ("2.0", "4", "2.1", "0.01")
    assert (by["2"]["final_cr"], by["2"]["window"]) == ("0.5", "8")  # point read from the Hydra overrides
    for k in ("1", "2", "3", "4"):
        assert by[k]["achieved_cr"] == "" and by[k]["kl_to_teacher"] == ""  # partial runs carry no metrics
    assert json.loads((tmp_path / "summary.json").read_text())[5]["kl_to_teacher"] == 0.03
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "FINISHED" in r.stdout and "PREEMPTED" in r.stdout


def test_summary_exit_status(tmp_path):
    _run_dir(tmp_path / "sweep", "0", 2.0, 4, report={"achieved_cr": 2.0, "kl_to_teacher": 0.1})
    r = _summary(tmp_path / "sweep", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "summary.csv").is_file() and not (tmp_path / "sweep" / "summary.csv").exists()
    (tmp_path / "empty").mkdir()
    r = _summary(tmp_path / "empty")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "holds no run dirs" in r.stderr
    r = _summary(tmp_path / "missing")
    assert r.returncode == 2 and "is not a directory" in r.stderr

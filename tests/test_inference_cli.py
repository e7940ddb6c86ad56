"""dms-generate: runs a DMS HF export and a plain model, JSON metrics, one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from convert_fixtures import make_hf_model, save_hf_model
from dms_megatron.launch.generate import main

NEW_TOKENS = 5
DMS_KEYS = {"dms_window_size": 3, "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0, "dms_cr": 8,
            "dms_separate_alpha": False, "dms_alpha_per": "head", "dms_tau": 0.1}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    save_hf_model(make_hf_model("qwen3"), root / "plain")
    save_hf_model(make_hf_model("qwen3"), root / "dms")
    cfg_path = root / "dms" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(DMS_KEYS)
    cfg_path.write_text(json.dumps(cfg))
    return root


def test_generate_dms_batch_json(dirs, capsys):
    rc = main(["--hf", str(dirs / "dms"), "--prompt-ids", "1 2 3 4 5 6 7 8", "--prompt-ids", "9,10,11",
               "--max-new-tokens", str(NEW_TOKENS), "--chunk-size", "4", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["press"] == "dms"
    assert [len(o) for o in res["outputs"]] == [NEW_TOKENS, NEW_TOKENS]
    m = res["metrics"][0]
    assert m["prompt_tokens"] == 8 and m["decoded_tokens"] == NEW_TOKENS - 1   # the last token is not fed back
    assert m["peak_resident"] <= m["vanilla_resident"]


def test_generate_baseline_with_cr_text_output(dirs, capsys):
    rc = main(["--hf", str(dirs / "plain"), "--prompt-ids", " ".join(map(str, range(16))), "--press", "streamingllm",
               "--cr", "2", "--max-new-tokens", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "press=streamingllm" in out and "cr_final=" in out


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", ""], "prompt 0 is empty"),
    (["--prompt-ids", "1 2 3", "--max-length", "2"], "more than the maximum length 2"),
    (["--prompt-ids", "1 x"], "must be integers"),
    (["--prompt", "hello"], "needs a tokenizer"),
    (["--prompt-ids", "1 2", "--press", "dms"], "not a DMS checkpoint"),
    (["--prompt-ids", "1 2", "--press", "h2o"], "budget=None"),
])
def test_bad_input_one_line_errors(dirs, capsys, args, message):
    rc = main(["--hf", str(dirs / "plain"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_missing_directory(tmp_path, capsys):
    assert main(["--hf", str(tmp_path / "none"), "--prompt-ids", "1"]) == 2
    assert capsys.readouterr().err == f"error: --hf {tmp_path / 'none'} does not exist\n"
    (tmp_path / "empty").mkdir()
    assert main(["--hf", str(tmp_path / "empty"), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --hf {tmp_path / 'empty'}: ") and "config.json does not exist" in err


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    from refit_fixtures import shared_assets

    return shared_assets(tmp_path_factory)


def test_generate_accepts_a_refit_run_dir_and_names_its_own_flags(assets, tmp_path):
    from cli_helpers import env, one_error_line
    from refit_fixtures import refit_dict, run_refit

    from dms_megatron.config import RefitConfig

    run_refit(RefitConfig.from_dict(refit_dict(assets, steps=1, save_interval=1)), tmp_path / "run", report=False)
    assert main(["--megatron", str(tmp_path / "run"), "--prompt-ids", "1 2 3", "--max-new-tokens", "2",
                 "--json"]) == 0
    r = subprocess.run([sys.executable, "-m", "dms_megatron.launch.generate", "--hf", str(tmp_path / "nope"),
                        "--prompt-ids", "1"], env=env(), capture_output=True, text=True, timeout=300)
    assert one_error_line(r) == f"error: --hf {tmp_path / 'nope'} does not exist"
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "dms_megatron.launch.generate", "--hf", str(tmp_path / "empty"),
                        "--prompt-ids", "1"], env=env(), capture_output=True, text=True, timeout=300)
    assert one_error_line(r).startswith(f"error: --hf {tmp_path / 'empty'}: ")

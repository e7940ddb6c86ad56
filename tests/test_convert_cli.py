"""dms-convert and checkpoint files through the real command: one-line errors before any rank, write errors that
leave nothing behind, the modeling code an export's auto_map names, a truncated checkpoint file named."""

import pytest

from cli_helpers import convert, one_error_line


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from convert_fixtures import make_hf_model, save_hf_model

    d = tmp_path_factory.mktemp("hf") / "qwen3"
    save_hf_model(make_hf_model("qwen3"), d)
    return d


def test_a_bad_tensor_parallel_import_is_one_line_before_any_rank(hf_dir, tmp_path):
    line = one_error_line(convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "m"),
                                     "--tp", "3"]))
    assert "--tp 3" in line and not (tmp_path / "m").exists()


def test_a_write_error_during_export_is_one_line_and_leaves_nothing(hf_dir, tmp_path):
    import resource

    assert convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "m")]).returncode == 0
    limit = 64 * 1024  # the model is larger: the safetensors write hits the file-size limit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = convert(["export", "--megatron-path", str(tmp_path / "m"), "--hf-path", str(tmp_path / "out"),
                  "--format", "plain"], preexec_fn=small_files)
    assert "writing" in one_error_line(r) and "File too large" in r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_write_error_during_import_is_one_line_naming_the_limit_and_leaves_nothing(hf_dir, tmp_path):
    import resource

    limit = 64 * 1024  # the checkpoint's data file is larger

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "m")],
                 preexec_fn=small_files)
    line = one_error_line(r)
    assert line.startswith(f"error: importing into {tmp_path / 'm'} failed: writing checkpoint")
    assert "files of at most 65,536 bytes (ulimit -f)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_carries_the_modeling_code_its_auto_map_names(hf_dir, tmp_path, megatron_single):
    from test_convert_roundtrip import _save_student

    from dms_megatron.config import DMSConfig

    assert convert(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "m")]).returncode == 0
    _save_student(tmp_path / "m", tmp_path / "student", DMSConfig(window=4), [1])
    code = tmp_path / "code"
    code.mkdir()
    (code / "configuration_qwen3_dms.py").write_text("class Qwen3ConfigDMS: pass\n")
    base = ["export", "--megatron-path", str(tmp_path / "student"), "--format", "dms"]
    line = one_error_line(convert(base + ["--hf-path", str(tmp_path / "a"), "--modeling-code", str(code)]))
    assert "lacks modeling_qwen3_dms.py" in line and not (tmp_path / "a").exists()
    (code / "modeling_qwen3_dms.py").write_text("import dms_package_not_here\nfrom .configuration_qwen3_dms "
                                                "import Qwen3ConfigDMS\n")
    r = convert(base + ["--hf-path", str(tmp_path / "b"), "--modeling-code", str(code)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "b" / "modeling_qwen3_dms.py").read_text() == (code / "modeling_qwen3_dms.py").read_text()
    assert "imports dms_package_not_here, which this environment lacks" in r.stderr
    r = convert(base + ["--hf-path", str(tmp_path / "c")])
    assert r.returncode == 0 and "pass --modeling-code DIR" in r.stderr
    assert not (tmp_path / "c" / "modeling_qwen3_dms.py").exists()


def test_a_truncated_checkpoint_file_is_named(tmp_path, megatron_single):
    from conftest import tiny_model_config

    from dms_megatron.checkpoint import CheckpointError, load_model_weights, save_checkpoint
    from dms_megatron.megatron.model import build_gpt_model

    model = build_gpt_model(tiny_model_config(), None, seq_length=16)
    save_checkpoint(tmp_path, 1, model)
    (part,) = sorted((tmp_path / "iter_0000001").glob("*.distcp"))[:1]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"data file {part} \(\d+ bytes, needs \d+\) is truncated"):
        load_model_weights(tmp_path, build_gpt_model(tiny_model_config(), None, seq_length=16))

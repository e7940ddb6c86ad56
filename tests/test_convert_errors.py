"""Bad input to dms-convert: one-line errors naming the tensor / file / field, and nothing left behind."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers.models.llama.modeling_llama  # noqa: F401  (imported before megatron's CPU compat layer)
from convert_fixtures import HF_DIVISIBLE_BY, make_hf_model, save_hf_model

from dms_megatron.families import FAMILIES

from dms_megatron.launch.convert import main
from dms_megatron.convert.hf_io import ConversionError, SafetensorsReader

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    save_hf_model(make_hf_model("llama"), d)
    return d


def _copy(hf_dir, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    tensors = load_file(hf_dir / WEIGHTS)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    save_file(tensors, dst / WEIGHTS, metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _import_error(tmp_path, src, capsys, out_name="meg"):
    out = tmp_path / out_name
    rc = main(["import", "--hf-model", str(src), "--megatron-path", str(out),
               "--make-vocab-size-divisible-by", str(HF_DIVISIBLE_BY)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert not list(tmp_path.glob(".*.tmp"))            # no temporary directory left behind
    return err[-1]


def test_unknown_architecture(tmp_path, hf_dir, capsys):
    src = _copy(hf_dir, tmp_path / "src", edit_config=lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    assert "unknown architecture ['GPT2LMHeadModel']" in _import_error(tmp_path, src, capsys)


@pytest.mark.parametrize("family,key", [(n, k) for n, f in FAMILIES.items() for k in f.refused])
def test_a_setting_the_family_refuses_is_named(tmp_path, capsys, family, key):
    """Every config.json setting a registered family refuses (sliding windows, biases it has no weights for)."""
    save_hf_model(make_hf_model(family), tmp_path / "hf")
    src = _copy(tmp_path / "hf", tmp_path / "src", edit_config=lambda c: c.update({key: True}))
    err = _import_error(tmp_path, src, capsys)
    assert f"{family} config.json: {key}=true" in err and "not supported" in err


def test_missing_tensor_is_named(tmp_path, hf_dir, capsys):
    src = _copy(hf_dir, tmp_path / "src", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "'model.layers.1.mlp.up_proj.weight' is missing" in _import_error(tmp_path, src, capsys)


def test_extra_tensor_is_named(tmp_path, hf_dir, capsys):
    def add(t):
        t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(4)

    src = _copy(hf_dir, tmp_path / "src", edit_tensors=add)
    assert "unexpected tensor 'model.layers.0.self_attn.o_proj.bias'" in _import_error(tmp_path, src, capsys)


def test_shape_mismatch_is_named(tmp_path, hf_dir, capsys):
    def bad(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1].clone()

    src = _copy(hf_dir, tmp_path / "src", edit_tensors=bad)
    err = _import_error(tmp_path, src, capsys)
    assert "'model.layers.0.self_attn.k_proj.weight'" in err and "has shape [31, 64], expected [32, 64]" in err


def test_truncated_safetensors_names_file_and_tensor(tmp_path, hf_dir, capsys):
    src = _copy(hf_dir, tmp_path / "src")
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(data[:-100])
    err = _import_error(tmp_path, src, capsys)
    assert "model.safetensors is truncated: tensor" in err


def test_garbage_header_is_reported_as_corrupt(tmp_path, hf_dir):
    src = _copy(hf_dir, tmp_path / "src")
    (src / WEIGHTS).write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(ConversionError, match="model.safetensors is corrupt: its safetensors header is not valid"):
        SafetensorsReader(src)


def test_llama3_rope_constants_megatron_cannot_represent(tmp_path, hf_dir, capsys):
    def edit(c):
        params = c.get("rope_parameters") or c["rope_scaling"]
        params["high_freq_factor"] = 2.0

    src = _copy(hf_dir, tmp_path / "src", edit_config=edit)
    assert "rope_scaling.high_freq_factor=2.0 differs from megatron-core" in _import_error(tmp_path, src, capsys)


def test_existing_non_empty_output_is_refused(tmp_path, hf_dir, capsys):
    out = tmp_path / "meg"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc = main(["import", "--hf-model", str(hf_dir), "--megatron-path", str(out)])
    assert rc == 2 and "already exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    rc = main(["export", "--megatron-path", str(tmp_path / "nowhere"), "--hf-path", str(out)])
    assert rc == 2 and "already exists and is not empty" in capsys.readouterr().err


def test_export_of_missing_checkpoint_and_dms_format_of_plain_model(megatron_single, tmp_path, hf_dir, capsys):
    rc = main(["export", "--megatron-path", str(tmp_path / "nowhere"), "--hf-path", str(tmp_path / "o1")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert main(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "meg"),
                 "--make-vocab-size-divisible-by", str(HF_DIVISIBLE_BY)]) == 0
    capsys.readouterr()
    rc = main(["export", "--megatron-path", str(tmp_path / "meg"), "--hf-path", str(tmp_path / "o2"),
               "--format", "dms"])
    assert rc == 2 and "records no dms_config" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".*.tmp"))


def test_failure_mid_export_leaves_nothing_behind(megatron_single, tmp_path, hf_dir, monkeypatch, capsys):
    import dms_megatron.convert.workflows as cli

    assert main(["import", "--hf-model", str(hf_dir), "--megatron-path", str(tmp_path / "meg"),
                 "--make-vocab-size-divisible-by", str(HF_DIVISIBLE_BY)]) == 0
    real = cli.write_safetensors_streaming

    def write_then_fail(directory, plan, produce, **kw):
        real(directory, plan[:3], produce, **kw)  # a partial shard really is on disk
        raise OSError("disk full")

    monkeypatch.setattr(cli, "write_safetensors_streaming", write_then_fail)
    capsys.readouterr()
    assert main(["export", "--megatron-path", str(tmp_path / "meg"), "--hf-path", str(tmp_path / "out"),
                 "--format", "plain"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: writing ") and "disk full" in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*.tmp"))

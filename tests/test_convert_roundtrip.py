"""dms-convert import / export through megatron checkpoints: byte-identical round trips, DMS HF format, tp/pp."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import transformers.models.llama.modeling_llama  # noqa: F401  (imported before megatron's CPU compat layer)
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
import transformers.models.qwen3.modeling_qwen3  # noqa: F401
from convert_fixtures import FAMILIES, HF_DIVISIBLE_BY, HF_HIDDEN, HF_KV_HEADS, HF_LAYERS, make_hf_model, \
    save_hf_model, tokens

from dms_megatron.config import DMSConfig
from dms_megatron.launch.convert import main

REPO = Path(__file__).resolve().parents[1]
DMS_WINDOW = 8
DMS_FINAL_CR = 4.0
STUDENT_ITERATION = 5
LATER_ITERATION = 7


def _import(hf_dir, meg_dir, *extra):
    rc = main(["import", "--hf-model", str(hf_dir), "--megatron-path", str(meg_dir),
               "--make-vocab-size-divisible-by", str(HF_DIVISIBLE_BY), *extra])
    assert rc == 0


def _export(meg_dir, out_dir, *extra):
    rc = main(["export", "--megatron-path", str(meg_dir), "--hf-path", str(out_dir), *extra])
    assert rc == 0


def _tensors(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_byte_identical(a_dir, b_dir):
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].view(torch.uint8).equal(b[k].view(torch.uint8)), k


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_hf_megatron_hf_round_trip_is_byte_identical(megatron_single, tmp_path, family, tied):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(family, tied=tied)
    save_hf_model(hf, tmp_path / "hf")
    _import(tmp_path / "hf", tmp_path / "meg")
    extra = json.loads((tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text())
    assert extra == 0
    _export(tmp_path / "meg", tmp_path / "out", "--format", "plain")
    _assert_byte_identical(tmp_path / "hf", tmp_path / "out")
    assert (tmp_path / "out" / "generation_config.json").is_file()  # side files travel through hf_assets
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, _ = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_bf16_round_trip_keeps_dtype_and_bytes(megatron_single, tmp_path):
    hf = make_hf_model("qwen2").to(torch.bfloat16)
    save_hf_model(hf, tmp_path / "hf")
    _import(tmp_path / "hf", tmp_path / "run" / "checkpoints")  # megatron master weights in fp32 (exact for bf16)
    # a dms-refit run dir is accepted as it is (its checkpoints/ holds the tracker), as dms-generate accepts it
    _export(tmp_path / "run", tmp_path / "out", "--format", "plain")  # dtype defaults to the original's
    _assert_byte_identical(tmp_path / "hf", tmp_path / "out")


def _save_student(meg_dir, student_dir, dms_cfg, iterations):
    """A DMS student checkpoint as the trainer writes it: teacher weights + (random) adapter, configs in extra."""
    from dataclasses import asdict

    from dms_megatron.checkpoint import read_checkpoint_configs
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.checkpoint import load_model_weights, save_checkpoint

    mc, _, extra = read_checkpoint_configs(meg_dir)
    student = build_gpt_model(mc, dms_cfg, seq_length=16)
    load_model_weights(meg_dir, student, allow_missing=("dms_alpha",))
    adapters = {}
    for it in iterations:
        with torch.no_grad():
            for n, p in student.named_parameters():
                if "dms_alpha" in n:
                    p.normal_(0, 1)
                    adapters[(it, n)] = p.detach().clone()
        save_checkpoint(student_dir, it, student,
                        extra={"model_config": asdict(mc), "dms_config": asdict(dms_cfg)})
    return adapters


def test_dms_export_matches_official_qwen3_dms_format(megatron_single, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("qwen3")
    save_hf_model(hf, tmp_path / "hf")
    _import(tmp_path / "hf", tmp_path / "meg")
    dms_cfg = DMSConfig(window=DMS_WINDOW, alpha_source="adapter", final_cr=DMS_FINAL_CR)
    adapters = _save_student(tmp_path / "meg", tmp_path / "student", dms_cfg, [STUDENT_ITERATION, LATER_ITERATION])

    _export(tmp_path / "student", tmp_path / "dms", "--format", "dms", "--iteration", str(STUDENT_ITERATION))
    cfg = json.loads((tmp_path / "dms" / "config.json").read_text())
    assert cfg["dms_alpha_scale"] == 100.0 and cfg["dms_initial_alpha_offset"] == 5.0
    assert cfg["dms_window_size"] == DMS_WINDOW and cfg["dms_cr"] == 4 and cfg["dms_separate_alpha"] is True
    assert cfg["dms_alpha_per"] == "head" and cfg["dms_tau"] == 0.1
    assert cfg["dms_paged_attention_block_size"] < DMS_WINDOW  # the official config asserts window > block size
    assert "architectures" not in cfg
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen3_dms.Qwen3ForCausalLMDMS"
    out = _tensors(tmp_path / "dms")
    for i in range(HF_LAYERS):
        proj = out[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"]
        norm = out[f"model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"]
        assert proj.shape == (HF_KV_HEADS, HF_HIDDEN) and norm.shape == (HF_HIDDEN,)
        meg = f"decoder.layers.{i}.self_attention.dms_alpha_"
        assert torch.equal(proj, adapters[(STUDENT_ITERATION, meg + "proj.weight")])  # the requested iteration
        assert torch.equal(norm, adapters[(STUDENT_ITERATION, meg + "norm.weight")])
    base = _tensors(tmp_path / "hf")
    assert all(torch.equal(base[k], out[k]) for k in base)

    # --format plain: a stock transformers checkpoint (no DMS keys or tensors) that loads without remote code
    _export(tmp_path / "student", tmp_path / "plain", "--format", "plain")
    plain_cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not any(k.startswith("dms_") for k in plain_cfg) and "auto_map" not in plain_cfg
    _assert_byte_identical(tmp_path / "hf", tmp_path / "plain")
    AutoModelForCausalLM.from_pretrained(tmp_path / "plain")

    # DMS HF -> megatron: the DMS config and adapter tensors come back
    _import(tmp_path / "dms", tmp_path / "meg2")
    from dms_megatron.checkpoint import read_checkpoint_configs

    _, dms_back, _ = read_checkpoint_configs(tmp_path / "meg2")
    assert (dms_back.window, dms_back.alpha_source, dms_back.final_cr) == (DMS_WINDOW, "adapter", DMS_FINAL_CR)
    _export(tmp_path / "meg2", tmp_path / "dms2", "--format", "dms")
    _assert_byte_identical(tmp_path / "dms", tmp_path / "dms2")


def test_qneuron_dms_export_adds_no_tensors(megatron_single, tmp_path):
    hf = make_hf_model("llama")
    save_hf_model(hf, tmp_path / "hf")
    _import(tmp_path / "hf", tmp_path / "meg")
    _save_student(tmp_path / "meg", tmp_path / "student", DMSConfig(window=DMS_WINDOW, alpha_source="qneuron"),
                  [STUDENT_ITERATION])
    _export(tmp_path / "student", tmp_path / "dms", "--format", "dms")
    cfg = json.loads((tmp_path / "dms" / "config.json").read_text())
    assert cfg["dms_separate_alpha"] is False and cfg["architectures"] == ["LlamaForCausalLM"]
    _assert_byte_identical(tmp_path / "hf", tmp_path / "dms")


def _run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "dms_megatron.launch.convert", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parallel
def test_import_at_tp2_pp2_round_trips_through_tp1_export(tmp_path):
    """Import with 4 ranks (each writes only its tp/pp shard of the HF tensors into its megatron model), export
    at tp=1/pp=1 through dist-checkpointing's resharding: byte-identical to the original tensors. Tied embeddings
    with pp=2 exercise the last stage's copy of the embedding."""
    hf = make_hf_model("qwen3", tied=True)
    save_hf_model(hf, tmp_path / "hf")
    r = _run_cli("import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "meg"),
                 "--tp", "2", "--pp", "2", "--make-vocab-size-divisible-by", str(HF_DIVISIBLE_BY))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run_cli("export", "--megatron-path", str(tmp_path / "meg"), "--hf-path", str(tmp_path / "out"),
                 "--format", "plain")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_byte_identical(tmp_path / "hf", tmp_path / "out")

"""The user journey: HF model -> (dms-convert import, or the HF dir itself) -> dms-refit (adapter) -> dms-convert
export -> transformers computes the re-fitted student, for every registered model family."""

import json
from dataclasses import asdict

import pytest
import torch

from convert_fixtures import FAMILIES, make_hf_model, save_hf_model
from refit_fixtures import SEQ, build_assets, refit_dict, run_refit

HF_VOCAB_FOR_TOKENIZER = 320  # >= the 300-token test tokenizer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["imported", "hf_dir"])
def test_import_refit_export_round_trip(megatron_single, tmp_path, init, family):
    from transformers import AutoModelForCausalLM

    from dms_megatron.checkpoint import load_checkpoint, read_checkpoint_configs
    from dms_megatron.config import DMSConfig, RefitConfig
    from dms_megatron.launch.convert import main as convert
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.megatron.runtime import DMSRuntime, dms_forward

    assets = build_assets(tmp_path / "assets")
    save_hf_model(make_hf_model(family, vocab_size=HF_VOCAB_FOR_TOKENIZER), tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_note.txt").write_text("a side file that must travel with the weights\n")
    assert convert(["import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "meg")]) == 0
    mc = read_checkpoint_configs(tmp_path / "meg")[0]
    source = tmp_path / ("meg" if init == "imported" else "hf")

    d = refit_dict(assets, steps=2, save_interval=2, init_checkpoint=str(source), mode="adapter")
    d["model"] = asdict(mc)
    d["dms"]["alpha_source"] = "adapter"
    run_refit(RefitConfig.from_dict(d), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    # the HF side files reach the student's checkpoints, whichever way the teacher came in
    assert (ckpt / "hf_assets" / "tokenizer_note.txt").read_text().startswith("a side file")

    assert convert(["export", "--megatron-path", str(ckpt), "--hf-path", str(tmp_path / "dms"),
                    "--format", "dms"]) == 0
    cfg = json.loads((tmp_path / "dms" / "config.json").read_text())
    assert cfg["dms_separate_alpha"] is True and cfg["dms_window_size"] == d["dms"]["window"]

    assert convert(["export", "--megatron-path", str(ckpt), "--hf-path", str(tmp_path / "plain"),
                    "--format", "plain"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager").float().eval()
    # the re-fitted student without eviction (teacher mode) is exactly the exported plain model
    student = build_gpt_model(mc, DMSConfig(alpha_source="adapter"), seq_length=SEQ)
    load_checkpoint(ckpt, student)
    ids = torch.randint(0, HF_VOCAB_FOR_TOKENIZER, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), dms_forward(student, DMSRuntime(mode="teacher")):
        ref = hf(ids).logits
        got = student(ids, torch.arange(16)[None].expand(2, -1), None)[..., :HF_VOCAB_FOR_TOKENIZER]
    assert torch.allclose(got, ref, atol=1e-4)

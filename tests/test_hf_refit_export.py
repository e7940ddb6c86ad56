"""The user journey: HF model -> dms-convert import -> dms-refit (adapter) -> dms-convert export -> transformers."""

from dataclasses import asdict

import torch

from convert_fixtures import make_hf_model, save_hf_model
from refit_fixtures import SEQ, build_assets, refit_dict

HF_VOCAB_FOR_TOKENIZER = 320  # >= the 300-token test tokenizer


def test_import_refit_export_round_trip(megatron_single, tmp_path):
    from transformers import AutoModelForCausalLM

    from dms_megatron.config import DMSConfig, ModelConfig
    from dms_megatron.convert.cli import main as convert
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.training.checkpointing import load_checkpoint, read_extra
    from dms_megatron.training.config import RefitConfig
    from dms_megatron.training.loop import run_refit

    assets = build_assets(tmp_path / "assets")
    save_hf_model(make_hf_model("qwen3", vocab_size=HF_VOCAB_FOR_TOKENIZER), tmp_path / "hf")
    assert convert(["import", "--hf-model", str(tmp_path / "hf"), "--megatron-path", str(tmp_path / "meg")]) == 0

    mc = ModelConfig(**read_extra(tmp_path / "meg")["model_config"])
    d = refit_dict(assets, steps=2, save_interval=2, init_checkpoint=str(tmp_path / "meg"), mode="adapter")
    d["model"] = asdict(mc)
    d["dms"]["alpha_source"] = "adapter"
    run_refit(RefitConfig.from_dict(d), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "hf_assets").is_dir() or not (tmp_path / "meg" / "hf_assets").is_dir()

    assert convert(["export", "--megatron-path", str(ckpt), "--hf-path", str(tmp_path / "dms"),
                    "--format", "dms"]) == 0
    import json

    cfg = json.loads((tmp_path / "dms" / "config.json").read_text())
    assert cfg["dms_separate_alpha"] is True and cfg["dms_window_size"] == d["dms"]["window"]

    assert convert(["export", "--megatron-path", str(ckpt), "--hf-path", str(tmp_path / "plain"),
                    "--format", "plain"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager").float().eval()
    # the re-fitted student in teacher mode (no eviction) is exactly the exported plain model
    student = build_gpt_model(mc, DMSConfig(alpha_source="adapter", teacher_mode=True), seq_length=SEQ)
    load_checkpoint(ckpt, student)
    ids = torch.randint(0, HF_VOCAB_FOR_TOKENIZER, (2, 16))
    with torch.no_grad():
        ref = hf(ids).logits
        got = student(ids, torch.arange(16)[None].expand(2, -1), None)[..., :HF_VOCAB_FOR_TOKENIZER]
    assert torch.allclose(got, ref, atol=1e-4)

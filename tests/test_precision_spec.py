"""Precision and layer spec as configuration: bf16 parameters with fp32 optimizer state through the real trainer,
checkpoints across precisions, the local spec's fused-SDPA core attention against megatron's own, and the TE spec's
one-line error where transformer-engine is absent."""

import importlib.util

import pytest
import torch

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model_config
from refit_fixtures import refit_dict, shared_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory, megatron_single):
    return shared_assets(tmp_path_factory)


def test_precision_names_map_to_parameter_dtypes():
    from dms_megatron.megatron.model import params_dtype, transformer_config

    assert params_dtype("bf16") is torch.bfloat16 and params_dtype("fp32") is torch.float32
    assert params_dtype("auto") is (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    cfg = transformer_config(tiny_model_config(), precision="bf16")
    assert cfg.params_dtype is torch.bfloat16 and cfg.pipeline_dtype is torch.bfloat16 and cfg.bf16
    with pytest.raises(ValueError, match="train.precision='fp8'"):
        params_dtype("fp8")


def test_bf16_refit_keeps_fp32_main_params_and_its_checkpoint_loads_in_fp32(assets, tmp_path):
    from dms_megatron.checkpoint import load_model_weights
    from dms_megatron.config import RefitConfig
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.training.run_config import write_run_config
    from dms_megatron.training.trainer import RefitTrainer, TrainerHooks

    d = refit_dict(assets, steps=2, save_interval=2, precision="bf16")
    seen = {}

    def grads(step, ddp):
        seen["param_dtypes"] = {p.dtype for n, p in ddp.named_parameters() if "layers" in n and p.dim() == 2}

    cfg = RefitConfig.from_dict(d)
    write_run_config(tmp_path, cfg)
    trainer = RefitTrainer(cfg, tmp_path, TrainerHooks(after_backward=grads))
    report = trainer.run()
    assert seen["param_dtypes"] == {torch.bfloat16}
    main = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert main and {p.dtype for p in main} == {torch.float32}  # the optimizer steps fp32 main parameters
    assert report["kl_to_teacher"] == report["kl_to_teacher"]  # finite, not NaN
    fp32 = build_gpt_model(cfg.model, cfg.dms, seq_length=cfg.train.seq_length)
    load_model_weights(tmp_path / "checkpoints", fp32)
    got = dict(fp32.named_parameters())
    for name, p in trainer.student.named_parameters():
        assert torch.equal(got[name], p.detach().float()), name  # bf16 values, exactly, in fp32


def test_fused_sdpa_core_attention_equals_megatrons_dot_product_attention(megatron_single):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from dms_megatron.megatron.core_attention import SDPACoreAttention
    from dms_megatron.megatron.model import build_gpt_model

    cfg = tiny_model_config()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    ref = build_gpt_model(cfg, None, seq_length=TINY_SEQ, fused_attention=False)
    fused = build_gpt_model(cfg, None, seq_length=TINY_SEQ, fused_attention=True)
    fused.load_state_dict(ref.state_dict())
    assert any(isinstance(m, SDPACoreAttention) for m in fused.modules())
    assert not any(isinstance(m, SDPACoreAttention) for m in ref.modules())
    ids = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(TINY_SEQ)[None].expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, pos, None), ref(ids, pos, None), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="transformer-engine present")
def test_te_spec_without_transformer_engine_names_the_fix(megatron_single):
    from dataclasses import asdict

    from dms_megatron.config import TINY_TEACHER, ConfigError, DMSConfig, ModelConfig
    from dms_megatron.megatron.model import build_gpt_model

    mc = tiny_model_config(spec="te")
    for dms in (None, DMSConfig(window=4)):
        with pytest.raises(ConfigError, match=r"model.spec=te needs transformer-engine: pip install -e '.\[gpu\]'"):
            build_gpt_model(mc, dms, seq_length=TINY_SEQ)
    assert ModelConfig(**dict(asdict(TINY_TEACHER), spec="te")).spec == "te"


def test_the_run_chooses_the_spec_the_teacher_is_built_with(assets):
    """model.spec is how to build the model, not part of the teacher's architecture: it reaches the trainer."""
    from dms_megatron.config import RefitConfig
    from dms_megatron.training.inputs import RunInputs

    d = refit_dict(assets)
    d["model"]["spec"] = "te"
    assert RunInputs.resolve(RefitConfig.from_dict(d), build=False).model_config.spec == "te"

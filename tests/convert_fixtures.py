"""Tiny random Hugging Face models (built offline from transformers configs) for the conversion tests."""

from __future__ import annotations

import torch
import transformers

from dms_megatron.families import FAMILIES as REGISTRY

# Sizes: GQA (4 query heads, 2 KV heads), head_dim 16, vocab not a multiple of the padding (padding is exercised).
HF_LAYERS = 2
HF_HIDDEN = 64
HF_FFN = 96
HF_HEADS = 4
HF_KV_HEADS = 2
HF_VOCAB = 100          # padded to 128 by make_vocab_size_divisible_by=64
HF_DIVISIBLE_BY = 64
HF_MAX_POS = 16384      # > 8192 so llama3 RoPE scaling is a valid config
SEQ = 12
BATCH = 2
QWEN3_HEAD_DIM = 24     # Qwen3 decouples head_dim from hidden/heads
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

#: every registered family: the conversion, inference and re-fit tests run over each
FAMILIES = tuple(REGISTRY)
#: what a family's tiny model sets beyond the shared sizes and the family's fixed config.json keys, to exercise
#: what its checkpoints use (a family not listed needs nothing more)
VARIANTS = {
    "llama": dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),  # llama3 RoPE scaling unless rope_llama3=False
    "qwen2": dict(rope_theta=1000000.0),
    "qwen3": dict(head_dim=QWEN3_HEAD_DIM, rope_theta=1000000.0),
}
# every family's transformers modeling code, imported before megatron's CPU compat layer is applied
MODEL_CLASSES = {name: getattr(transformers, f.architecture) for name, f in REGISTRY.items()}


def hf_config(family: str, *, tied: bool = False, rope_llama3: bool = True, **over):
    """A transformers config of ``family`` (its own config class) with the test sizes."""
    fam = REGISTRY[family]
    kw = dict(fam.hf_fixed, num_hidden_layers=HF_LAYERS, hidden_size=HF_HIDDEN, intermediate_size=HF_FFN,
              num_attention_heads=HF_HEADS, num_key_value_heads=HF_KV_HEADS, vocab_size=HF_VOCAB,
              max_position_embeddings=HF_MAX_POS, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    kw.update(VARIANTS.get(family, {}))
    if not rope_llama3:
        kw.pop("rope_scaling", None)
    kw.update(over)
    return transformers.AutoConfig.for_model(fam.model_type, **kw)


def make_hf_model(family: str, seed: int = 0, **kw):
    """A random fp32 transformers causal LM; biases and norm weights randomised so that every tensor matters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **kw), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.float().eval()


def save_hf_model(model, path) -> None:
    model.save_pretrained(path, safe_serialization=True)


def tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, HF_VOCAB, (BATCH, SEQ), generator=g)
    return ids, torch.arange(SEQ)[None].expand(BATCH, -1)

"""Megatron-LM's own checkpoints (``--ckpt-format torch_dist``) as a re-fit's starting point and for export.

Megatron-LM's ``save_checkpoint`` writes ``<save>/iter_NNNNNNN/`` with megatron-core's ``dist_checkpointing.save`` of
``{"args": <its argparse Namespace>, "checkpoint_version": 3.0, "iteration": N, "model": GPTModel's sharded state
dict, "optimizer", "opt_param_scheduler", "rng_state", ...}`` and ``<save>/latest_checkpointed_iteration.txt``. The
tensors carry the GPT model's global keys (``decoder.layers.self_attention.linear_qkv.weight``, ...), the same as this
project's checkpoints, so a strict resharding load reads them at any tp x pp; the architecture comes from ``args``
(this project's checkpoints record it as ``extra['model_config']`` instead). Both layer specs (local, Transformer
Engine) save the pre-norms under the TE names; older megatron-core saved the local spec's under its module names
(``input_layernorm.weight``), which ``megatron.sharding.spec_alias`` maps.
"""

from __future__ import annotations

from argparse import Namespace
from typing import List, Optional, Sequence, Tuple

from megatron.core import dist_checkpointing

from dms_megatron.checkpoint.store import (CheckpointError, load_model_weights, read_checkpoint_configs, read_common,
                                           resolve_checkpoint)
from dms_megatron.config import ConfigError, DMSConfig, ModelConfig
from dms_megatron.families import FAMILIES, family_for_block

#: what this project's decoder is; a Megatron-LM model that differs cannot load into it
SUPPORTED = {"normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False, "position_embedding_type": "rope",
             "num_experts": None}

#: ModelConfig fields compared with a run's model config (the issue of a Megatron-LM user: every one in one line)
COMPARED = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
            "vocab_size", "rotary_base", "rope_scaling", "norm_epsilon", "qk_layernorm", "add_qkv_bias",
            "tie_embeddings")


def megatron_lm_args(load_dir, iteration: Optional[int] = None) -> Optional[Namespace]:
    """The training ``args`` of a checkpoint written by Megatron-LM, or None for one written by this project
    (which records ``extra['model_config']``)."""
    common = read_common(load_dir, iteration)
    if "model_config" in common.get("extra", {}) or "args" not in common or "checkpoint_version" not in common:
        return None
    return common["args"]


def model_config_from_args(args: Namespace, like: Optional[ModelConfig] = None) -> ModelConfig:
    """The architecture in Megatron-LM's ``args``. With ``like`` (a run's model config): its family (when its block
    has the checkpoint's q/k/v biases and q/k norms, else the registered family that has), spec and (when
    ``args`` has no ``vocab_size``, as with a Hugging Face tokenizer) vocabulary size, and a one-line ConfigError
    naming every field where the two differ, unsupported features included."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - older Megatron-LM lacks some args
    heads = args.num_attention_heads
    vocab = g("vocab_size") or (like.vocab_size if like is not None else args.padded_vocab_size)
    qk_norm, qkv_bias = bool(g("qk_layernorm", False)), bool(g("add_qkv_bias", False))
    block = FAMILIES[like.family].block if like is not None else None
    fits = block is not None and (block.qkv_bias, block.qk_norm) == (qkv_bias, qk_norm)
    family = like.family if fits else family_for_block(qkv_bias, qk_norm).name
    mc = ModelConfig(
        family=family, num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=g("ffn_hidden_size") or 4 * args.hidden_size, num_attention_heads=heads,
        num_query_groups=g("num_query_groups") if g("group_query_attention") else heads,
        kv_channels=g("kv_channels") or args.hidden_size // heads, vocab_size=vocab,
        max_position_embeddings=g("max_position_embeddings") or g("seq_length"),
        rotary_base=float(g("rotary_base", 10000)), rope_scaling="llama3" if g("use_rope_scaling") else None,
        rope_scaling_factor=float(g("rope_scaling_factor", 8.0)), norm_epsilon=float(g("norm_epsilon", 1e-5)),
        add_qkv_bias=qkv_bias, qk_layernorm=qk_norm,
        tie_embeddings=not g("untie_embeddings_and_output_weights", False),
        make_vocab_size_divisible_by=g("make_vocab_size_divisible_by", 128),
        init_method_std=float(g("init_method_std", 0.02)), spec=like.spec if like is not None else "local")
    diff = [f"{k}: checkpoint {g(k)} (supported: {v})" for k, v in SUPPORTED.items()
            if g(k, v) != v and not (k == "num_experts" and not g(k))]
    if like is not None:
        diff += [f"{f}: config {getattr(like, f)} vs checkpoint {getattr(mc, f)}" for f in COMPARED
                 if getattr(like, f) != getattr(mc, f)]
    padded, tp = g("padded_vocab_size"), g("tensor_model_parallel_size", 1)
    if padded is not None and padded != mc.padded_vocab_size(tp):
        diff.append(f"padded vocabulary: checkpoint {padded} rows, but vocab {vocab} padded to a multiple of "
                    f"make_vocab_size_divisible_by {mc.make_vocab_size_divisible_by} x tp {tp} is "
                    f"{mc.padded_vocab_size(tp)}")
    if diff:
        raise ConfigError("the Megatron-LM checkpoint does not match "
                          f"{'the model config' if like is not None else 'this decoder'}: " + "; ".join(diff))
    return mc


def checkpoint_configs(load_dir, iteration: Optional[int] = None, like: Optional[ModelConfig] = None
                       ) -> Tuple[ModelConfig, Optional[DMSConfig], dict]:
    """(architecture, DMS settings or None, extra) of a megatron checkpoint written by this project or by
    Megatron-LM (whose architecture is read from its ``args``, checked against ``like`` when given)."""
    args = megatron_lm_args(load_dir, iteration)
    if args is None:
        return read_checkpoint_configs(load_dir, iteration)
    return model_config_from_args(args, like), None, {"megatron_lm": True}


def _global_rows(load_dir, iteration: Optional[int]) -> dict:
    d, _ = resolve_checkpoint(load_dir, iteration)
    meta = dist_checkpointing.load_tensors_metadata(str(d))
    return {k: meta[k].global_shape[0] for k in ("embedding.word_embeddings.weight", "output_layer.weight")
            if k in meta}


def load_weights(load_dir, model, iteration: Optional[int] = None, allow_missing: Sequence[str] = ()) -> List[str]:
    """``store.load_model_weights`` for any megatron checkpoint. A Megatron-LM checkpoint saved at another tp pads the
    vocabulary to other row counts (a multiple of make_vocab_size_divisible_by x tp): the rows both hold load and
    the padding rows stay zero, as for this project's checkpoints; one that lacks real-token rows is refused in one
    line naming both sizes."""
    if megatron_lm_args(load_dir, iteration) is not None:
        m = model[0] if isinstance(model, (list, tuple)) else model
        m = getattr(m, "module", m)
        real = getattr(getattr(m, "model_config", None), "vocab_size", m.vocab_size)
        for key, rows in _global_rows(load_dir, iteration).items():
            if rows < real:
                raise CheckpointError(f"{load_dir}: {key} has {rows} rows (the padded vocabulary Megatron-LM saved) "
                                      f"but this model's vocabulary has {real} tokens")
    return load_model_weights(load_dir, model, iteration, allow_missing=allow_missing)


__all__ = ["megatron_lm_args", "model_config_from_args", "checkpoint_configs", "load_weights", "SUPPORTED",
           "COMPARED"]

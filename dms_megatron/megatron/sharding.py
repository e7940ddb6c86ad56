"""Sharded-state-dict rewrites that keep checkpoints' global layout but save/load memory.

megatron-core describes a SwiGLU ``linear_fc1`` weight [2 * ffn / tp, h] as a factory that splits it into its gate
and up halves (two fragments of the global [2 * ffn, h] tensor, so tp can be resharded). Both halves are views of one
storage, and the dist-checkpointing writer clones every view whose storage is larger than itself; the loader
concatenates the halves into new tensors after reading. For a whole model that is one extra copy of every fc1
weight (~37% of a Llama's parameters) held at once.

At tp = 1 the two halves are adjacent in the global tensor, so one ShardedTensor over the whole local weight
describes exactly the same global tensor; checkpoints written either way load either way (the reader reshards
chunks).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def merge_swiglu_factories(sharded: dict) -> dict:
    """Replace each tp=1 SwiGLU fc1 factory in a (flat) model sharded state dict by one ShardedTensor over its
    whole weight, in place; returns ``sharded``. Factories that do not split into two adjacent halves of their own
    tensor are left as they are."""
    for name, v in list(sharded.items()):
        if not isinstance(v, ShardedTensorFactory) or v.flattened_range is not None:
            continue
        parts = v.build_fn(v.key, v.data, v.replica_id, v.flattened_range)
        if not (isinstance(parts, (list, tuple)) and len(parts) == 2
                and all(isinstance(p, ShardedTensor) for p in parts)):
            continue
        gate, up = parts
        ax = next((i for i, (a, b) in enumerate(zip(gate.global_offset, up.global_offset)) if a != b), None)
        if ax is None or gate.axis_fragmentations[ax] != 2:  # tp > 1: this rank's halves are not adjacent
            continue
        local = ax - gate.prepend_axis_num
        if gate.data.data_ptr() != v.data.data_ptr() or gate.local_shape[local] * 2 != v.data.shape[local] \
                or up.global_offset[ax] != gate.global_offset[ax] + gate.local_shape[local]:
            continue
        frags = list(gate.axis_fragmentations)
        frags[ax] = 1
        sharded[name] = dataclasses.replace(gate, data=v.data, local_shape=tuple(v.data.shape),
                                            axis_fragmentations=tuple(frags))
    return sharded


#: norm weights the Transformer Engine layer spec fuses into the following linear: local name -> TE name. Today's
#: megatron-core saves both specs' pre-norms under the TE names; older releases saved the local spec's as its own.
TE_FUSED_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                  "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def spec_alias(key: str) -> Optional[str]:
    """The same tensor's checkpoint key under the other naming (local module name <-> Transformer Engine name), or
    None for a tensor both name alike: ``decoder.layers.input_layernorm.weight`` <->
    ``decoder.layers.self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm.weight`` <->
    ``mlp.linear_fc1.layer_norm_weight``."""
    for local, te in TE_FUSED_NORMS.items():
        for a, b in ((local, te), (te, local)):
            if key.endswith("." + a):
                return key[: -len(a)] + b
    return None


__all__ = ["merge_swiglu_factories", "spec_alias", "TE_FUSED_NORMS"]

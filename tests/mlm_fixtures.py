"""A checkpoint written the way Megatron-LM writes one (``--ckpt-format torch_dist``): megatron-core's
``dist_checkpointing.save`` of ``{"args": Namespace, "checkpoint_version": 3.0, "iteration": N, "model":
GPTModel.sharded_state_dict(), ...}`` into ``<save>/iter_NNNNNNN`` plus ``latest_checkpointed_iteration.txt`` (no
optimizer, as with ``--no-save-optim``). Today both of megatron-core's layer specs save the two pre-norms under the
Transformer Engine names (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``);
``legacy_names`` saves them as the local spec of older megatron-core releases did (``input_layernorm.weight``,
``pre_mlp_layernorm.weight``). ``args`` are the ones Megatron-LM records for a Llama-style
model (``--normalization RMSNorm --swiglu --disable-bias-linear --group-query-attention
--position-embedding-type rope --untie-embeddings-and-output-weights``)."""

from __future__ import annotations

import dataclasses
import os
from argparse import Namespace
from pathlib import Path

ITERATION = 7


def megatron_lm_args(mc: dict, tp: int, pp: int, legacy_names: bool) -> Namespace:
    div = mc["make_vocab_size_divisible_by"] * tp
    return Namespace(
        num_layers=mc["num_layers"], hidden_size=mc["hidden_size"], ffn_hidden_size=mc["ffn_hidden_size"],
        num_attention_heads=mc["num_attention_heads"], group_query_attention=True,
        num_query_groups=mc["num_query_groups"], kv_channels=mc["kv_channels"], vocab_size=None,
        padded_vocab_size=-(-mc["vocab_size"] // div) * div,
        make_vocab_size_divisible_by=mc["make_vocab_size_divisible_by"], tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, max_position_embeddings=mc["max_position_embeddings"],
        seq_length=mc["max_position_embeddings"], position_embedding_type="rope", rotary_base=10000,
        use_rope_scaling=False, normalization="RMSNorm", norm_epsilon=mc["norm_epsilon"], swiglu=True,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False, untie_embeddings_and_output_weights=True,
        num_experts=None, init_method_std=0.02, tokenizer_type="HuggingFaceTokenizer",
        transformer_impl="local" if legacy_names else "transformer_engine", ckpt_format="torch_dist")


def write(save: str, mc: dict, tp: int, pp: int, legacy_names: bool, dump: str) -> None:
    """This rank's part of the checkpoint; ``dump`` + ``.rank<r>`` gets its local weights and partition dims."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from dms_megatron.checkpoint.store import _use_results_queue
    from dms_megatron.config import ModelConfig
    from dms_megatron.megatron.distributed import init_process_groups
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.megatron.sharding import TE_FUSED_NORMS

    init_process_groups(tp, pp, seed=4321)
    model = build_gpt_model(ModelConfig(**mc), None, seq_length=mc["max_position_embeddings"])
    with torch.no_grad():  # norms away from their initial ones, so a norm loaded from the wrong tensor shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    sd = model.sharded_state_dict()
    if legacy_names:
        for name, sh in sd.items():
            for local, te in TE_FUSED_NORMS.items():
                if isinstance(sh, ShardedTensor) and sh.key.endswith(te):
                    sd[name] = dataclasses.replace(sh, key=sh.key[: -len(te)] + local)
    state = {"args": megatron_lm_args(mc, tp, pp, legacy_names), "checkpoint_version": 3.0, "iteration": ITERATION,
             "model": sd, "num_floating_point_operations_so_far": 0}
    d = Path(save) / f"iter_{ITERATION:07d}"
    rank = dist.get_rank()
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    _use_results_queue(in_background=False)
    dist_checkpointing.save(state, str(d))
    dist.barrier()
    if rank == 0:
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    local = {n: (p.detach().clone(), getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False)
                 else None) for n, p in model.named_parameters()}
    torch.save({"tp_rank": parallel_state.get_tensor_model_parallel_rank(), "weights": local},
               f"{dump}.rank{rank}")


def spawned_rank(rank: int, world: int, port: int, q, save, mc, tp, pp, legacy_names, dump) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    write(save, mc, tp, pp, legacy_names, dump)
    q.put((rank, True))


def merged(dump: str, world: int) -> dict:
    """The full weights of the written model, put together by hand from the ranks' shards: tensor-parallel shards
    concatenated along their partition dim, each rank's SwiGLU [gate; up] halves re-paired."""
    import torch

    ranks = sorted((torch.load(f"{dump}.rank{r}", weights_only=False) for r in range(world)),
                   key=lambda d: d["tp_rank"])
    out = {}
    for name, (w0, dim) in ranks[0]["weights"].items():
        parts = [r["weights"][name][0] for r in ranks]
        if dim is None:
            out[name] = w0
        elif name.endswith("linear_fc1.weight"):
            halves = [p.chunk(2, dim=dim) for p in parts]
            out[name] = torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)],
                                  dim)
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def walkthrough_inputs(root: Path, assets: dict) -> dict:
    """What a Megatron-LM user brings (README "Your own model"): a Megatron-LM checkpoint of the tiny test model
    (its ``--save`` dir) and two JSONL corpora; the data is built by the walk-through's own preprocessing command."""
    import json

    from dms_megatron.data.corpus import stdlib_texts

    write(str(root / "mlm-save"), assets["model"], 1, 1, False, str(root / "mlm-dump"))
    texts = list(stdlib_texts(120_000, chunk_chars=1000))
    for name, part in (("a", texts[0::2]), ("b", texts[1::2])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return {"ckpt": str(root / "mlm-save"), "a": str(root / "a.jsonl"), "b": str(root / "b.jsonl"),
            "data": str(root / "data")}


def walkthrough_overrides(assets: dict, w: dict, steps: int = 2) -> list:
    """The walk-through's re-fit overrides for the tiny model (a real model names its preset: model=qwen3-8b)."""
    model = [f"model.{k}={v}" for k, v in assets["model"].items() if v is not None]
    return model + [
        "embedded=false", f"train.init_checkpoint={w['ckpt']}",
        f"data.blend=[0.3,{w['data']}/a,0.7,{w['data']}/b]", "data.split=[90,10,0]",
        f"data.tokenizer={assets['tokenizer']}", f"data.recall_eval={assets['recall']}", f"train.steps={steps}",
        "train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_batches=1",
        "train.save_interval=100", "train.recall_eval_limit=2", "train.warmup_steps=1", "logging.wandb=false",
        "logging.progress=false", "dms.window=4", "dms.final_step=2", "dms.final_cr=2",
    ]

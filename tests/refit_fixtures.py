"""Small self-made assets for trainer tests: tokenizer, indexed data, a random 2-layer teacher checkpoint."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

from conftest import tiny_model_config

SEQ = 64
VOCAB_TARGET = 300
RECALL_LEN = 40


def build_data_assets(root: Path, recall_items: int = 8) -> dict:
    """Writes tokenizer/, data/{train,valid}.{bin,idx} and recall.jsonl under ``root`` (no model, no process group);
    returns their paths and the tokenizer's size."""
    from dms_megatron.data.corpus import stdlib_texts
    from dms_megatron.data.indexed import write_indexed
    from dms_megatron.data.recall import RecallSpec, RecallTask, filler_from, write_items
    from dms_megatron.data.tokenizer import train_tokenizer

    texts = list(stdlib_texts(200_000, chunk_chars=1000))
    tok = train_tokenizer(texts, VOCAB_TARGET, root / "tokenizer")
    docs = [tok(t)["input_ids"] for t in texts]
    rng = random.Random(0)
    task = RecallTask(tok, RecallSpec(pairs=(2, 2), gap=(1, 3), tail=(4, 8), prefix=(0, 2)))
    filler = filler_from(docs[0])(rng)
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_indexed(root / "data" / "train", docs[:150], len(tok))
    write_indexed(root / "data" / "valid", docs[150:], len(tok))
    write_items(root / "recall.jsonl", [task.item(rng, filler, RECALL_LEN) for _ in range(recall_items)])
    return {"tokenizer": str(root / "tokenizer"), "train": str(root / "data" / "train"),
            "valid": str(root / "data" / "valid"), "recall": str(root / "recall.jsonl"), "vocab": len(tok)}


def build_assets(root: Path, init_std: float = 0.02, **model) -> dict:
    """Writes tokenizer/, data/{train,valid}.{bin,idx}, recall.jsonl and teacher/ under ``root``; ``model``
    overrides the tiny teacher's shape."""
    import torch

    from dms_megatron.checkpoint import save_checkpoint
    from dms_megatron.megatron.model import build_gpt_model

    data = build_data_assets(root)
    cfg = tiny_model_config(**dict(dict(vocab_size=data["vocab"], max_position_embeddings=SEQ,
                                        init_method_std=init_std), **model))
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)  # megatron draws initial weights from its own RNG stream: the same teacher
    teacher = build_gpt_model(cfg, None, seq_length=SEQ)  # whichever tests ran before
    save_checkpoint(root / "teacher", 0, teacher, extra={"model_config": asdict(cfg), "dms_config": None})
    return {"model": asdict(cfg), "tokenizer": data["tokenizer"], "train": data["train"], "valid": data["valid"],
            "recall": data["recall"], "teacher": str(root / "teacher")}


_CACHE: dict = {}


def shared_assets(tmp_path_factory, init_std: float = 0.02, **model) -> dict:
    """``build_assets`` once per test session, teacher init std and model shape (building costs seconds of CPU)."""
    key = (init_std, tuple(sorted(model.items())))
    if key not in _CACHE:
        _CACHE[key] = build_assets(tmp_path_factory.mktemp(f"refit-assets-{init_std}"), init_std=init_std, **model)
    return _CACHE[key]


def refit_dict(assets: dict, **train) -> dict:
    t = dict(mode="full", steps=6, micro_batch_size=2, global_batch_size=4, seq_length=SEQ, lr=3e-3, min_lr=3e-4,
             warmup_steps=1, save_interval=3, eval_batches=2, recall_eval_limit=8,
             init_checkpoint=assets["teacher"])
    t.update(train)
    return {
        "model": dict(assets["model"]),
        "dms": dict(window=4, final_cr=2.0, initial_cr=1.0, final_step=4, alpha_source="qneuron"),
        "train": t,
        "data": dict(train_prefix=assets["train"], valid_prefix=assets["valid"], tokenizer=assets["tokenizer"],
                     recall_eval=assets["recall"]),
        "parallel": dict(tp=1, pp=1),
        "logging": dict(wandb=False, progress=False),
        "embedded": False,
    }


def refit_trainer(cfg, run_dir, after_backward=None):
    """What the launcher does for one in-process rank before training: write the run's config.yaml; the trainer."""
    from dms_megatron.training.run_config import write_run_config
    from dms_megatron.training.trainer import RefitTrainer, TrainerHooks

    write_run_config(run_dir, cfg)
    return RefitTrainer(cfg, run_dir, TrainerHooks(after_backward=after_backward))


def run_refit(cfg, run_dir, report: bool = True, after_backward=None) -> dict:
    """What the launcher does for one in-process rank: write the run's config.yaml, then train (and report)."""
    return refit_trainer(cfg, run_dir, after_backward).run(report=report)

"""The embedded default: a tiny Llama-architecture teacher pretrained here on stdlib text + the recall task.

``ensure_tiny_teacher()`` builds (once, cached on disk) the tokenizer, the train/valid indexed datasets, the
held-out recall questions and the pretrained teacher checkpoint, and returns their locations. A second call, or a
second process while the first is building, reuses the same directory.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from dms_megatron.config import ModelConfig

VERSION = "tiny-teacher-v5"
SEQ_LENGTH = 256
VOCAB = 1024
TINY_MODEL = ModelConfig(family="llama", num_layers=4, hidden_size=192, ffn_hidden_size=512, num_attention_heads=6,
                         num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=SEQ_LENGTH,
                         rotary_base=10000.0, make_vocab_size_divisible_by=128)


@dataclass
class BuildRecipe:
    text_chars: int = 3_000_000
    recall_docs_train: int = 12_000
    recall_docs_valid: int = 400
    eval_items: int = 200
    eval_filler: int = 120
    filler_min: int = 40
    filler_max: int = 160
    prefix_max: int = 60
    eval_prefix: int = 30
    pretrain_steps: int = 700
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 30
    answer_loss_weight: float = 32.0  # recall answers are ~1 token in 256: upweighted so the task is learned
    warm_steps: int = 200  # curriculum: recall-only batches whose filler grows from warm_filler_start to filler_max
    warm_filler_start: int = 4
    seed: int = 1234


@dataclass
class TinyAssets:
    root: Path
    model_config: ModelConfig
    tokenizer_dir: Path
    train_prefix: str
    valid_prefix: str
    recall_eval: Path
    teacher_checkpoint: Path
    seq_length: int
    eos_id: int
    pad_id: int
    info: dict


def cache_root(cache_dir: Optional[str] = None) -> Path:
    base = cache_dir or os.environ.get("DMS_CACHE_DIR") or os.path.join(Path.home(), ".cache", "dms-megatron")
    return Path(base)


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_assets(root: Path) -> TinyAssets:
    info = json.loads((root / "assets.json").read_text())
    return TinyAssets(
        root=root, model_config=ModelConfig(**info["model_config"]), tokenizer_dir=root / "tokenizer",
        train_prefix=str(root / "data" / "train"), valid_prefix=str(root / "data" / "valid"),
        recall_eval=root / "recall_eval.jsonl", teacher_checkpoint=root / "teacher", seq_length=info["seq_length"],
        eos_id=info["eos_id"], pad_id=info["pad_id"], info=info,
    )


def ensure_tiny_teacher(cache_dir: Optional[str] = None, *, quiet: bool = False,
                        recipe: Optional[BuildRecipe] = None) -> TinyAssets:
    """Return the embedded default's assets, building them first if the cache has no complete copy."""
    root = cache_root(cache_dir) / VERSION
    if (root / "assets.json").is_file():
        return _load_assets(root)
    with _file_lock(cache_root(cache_dir) / f".{VERSION}.lock"):
        if (root / "assets.json").is_file():  # built by another process while we waited
            return _load_assets(root)
        tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _build(tmp, recipe or BuildRecipe(), quiet=quiet)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load_assets(root)


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[tiny-teacher] {msg}", flush=True)


def _build(root: Path, r: BuildRecipe, quiet: bool) -> None:
    from dms_megatron.data.corpus import stdlib_texts
    from dms_megatron.data.indexed import write_indexed
    from dms_megatron.data.recall import RecallSpec, RecallTask, write_eval
    from dms_megatron.data.tokenizer import train_tokenizer

    t0 = time.time()
    texts = list(stdlib_texts(r.text_chars))
    tok = train_tokenizer(texts, VOCAB, root / "tokenizer")
    if len(tok) > TINY_MODEL.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens > model vocab {TINY_MODEL.vocab_size}")
    docs = [tok(t)["input_ids"] for t in texts]
    rng = random.Random(r.seed)
    rng.shuffle(docs)
    n_valid_text = max(4, len(docs) // 20)
    valid_text, train_text = docs[:n_valid_text], docs[n_valid_text:]
    _log(quiet, f"tokenizer + corpus: {sum(map(len, docs))} tokens in {len(docs)} chunks ({time.time() - t0:.0f}s)")

    # One statement "<|kv|> <|k0|> v" (a fixed marker key, one of 32 values) at a random offset, recalled after a
    # long filler: a pattern a 4-layer model learns in minutes, and the student must keep exactly the statement's
    # tokens through the filler (a 16-token window or "keep the first tokens" cannot answer; chance is 1/32).
    spec = RecallSpec(num_pairs=1, value_len=1, num_queries=1, key_pool=1)
    task = eval_task = RecallTask(tok, spec)

    def filler(pool, n):
        if n <= 0:
            return []
        d = pool[rng.randrange(len(pool))]
        while len(d) < n + 1:
            d = pool[rng.randrange(len(pool))]
        i = rng.randrange(len(d) - n)
        return d[i:i + n]

    # Every document is exactly SEQ_LENGTH tokens, so megatron's packed samples (stride SEQ_LENGTH) start at a
    # document boundary and no recall example is cut between two training sequences.
    def chunks(pool):
        flat = [t for d in pool for t in d]
        return [flat[i:i + SEQ_LENGTH] for i in range(0, len(flat) - SEQ_LENGTH, SEQ_LENGTH)]

    def recall_docs(pool, count):
        out = []
        for _ in range(count):
            toks = task.example(rng, filler(pool, rng.randint(r.filler_min, r.filler_max)),
                                filler(pool, rng.randint(0, r.prefix_max)))[0]
            out.append(toks + filler(pool, SEQ_LENGTH - len(toks)))
        return out

    train_docs = chunks(train_text) + recall_docs(train_text, r.recall_docs_train)
    valid_docs = chunks(valid_text) + recall_docs(valid_text, r.recall_docs_valid)
    rng.shuffle(train_docs)
    rng.shuffle(valid_docs)
    (root / "data").mkdir()
    write_indexed(root / "data" / "train", train_docs, len(tok))
    write_indexed(root / "data" / "valid", valid_docs, len(tok))
    write_eval(root / "recall_eval.jsonl",
               [eval_task.eval_item(rng, filler(valid_text, r.eval_filler), filler(valid_text, r.eval_prefix))
                for _ in range(r.eval_items)])
    info = {"version": VERSION, "model_config": asdict(TINY_MODEL), "seq_length": SEQ_LENGTH,
            "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "recipe": asdict(r),
            "train_tokens": sum(map(len, train_docs)), "vocab_used": len(tok)}
    _log(quiet, f"datasets written ({info['train_tokens']} train tokens, {time.time() - t0:.0f}s); pretraining")

    def warm_batch(step):
        # short distances first: the "find the value" attention gets a usable gradient only when it is among a few
        # candidates; the filler then grows to the full range (plain long-filler pretraining plateaus at chance)
        hi = r.warm_filler_start + (r.filler_max - r.warm_filler_start) * step // max(1, r.warm_steps)
        docs = []
        for _ in range(r.batch_size):
            toks = task.example(rng, filler(train_text, rng.randint(0, hi)),
                                filler(train_text, rng.randint(0, r.prefix_max)))[0]
            docs.append(toks + filler(train_text, SEQ_LENGTH + 1 - len(toks)))
        d = torch.tensor(docs)
        labels = d[:, 1:]
        mask = ((labels != tok.eos_token_id) & (labels != tok.pad_token_id)).float()
        return {"tokens": d[:, :-1], "labels": labels, "loss_mask": mask,
                "position_ids": torch.arange(SEQ_LENGTH).expand(r.batch_size, -1)}

    info.update(_pretrain(root, r, tok, task, warm_batch, quiet))
    info["build_seconds"] = round(time.time() - t0, 1)
    (root / "assets.json").write_text(json.dumps(info, indent=2))
    _log(quiet, f"done in {info['build_seconds']}s: recall acc {info['teacher_recall_acc']:.3f}, "
                f"valid loss {info['teacher_valid_loss']:.3f}")


def answer_weights(tokens: torch.Tensor, loss_mask: torch.Tensor, task, weight: float) -> torch.Tensor:
    """Per-token loss weights [b, s]: ``loss_mask`` with the recall answers (the label after ``<|q|> key``) scaled.

    tokens/loss_mask [b, s]; position t predicts tokens[t + 1], so t is an answer position when tokens[t] is a key
    and tokens[t - 1] is the query marker."""
    is_key = torch.isin(tokens, torch.tensor(task.keys, dtype=tokens.dtype))
    after_q = torch.zeros_like(is_key)
    after_q[:, 1:] = tokens[:, :-1] == task.q
    w = loss_mask.float().clone()
    w[is_key & after_q] *= weight
    return w


def _pretrain(root: Path, r: BuildRecipe, tok, task, warm_batch, quiet: bool) -> dict:
    """Plain next-token pretraining of the stock megatron model (tp=pp=1, this process)."""
    from dms_megatron.data.indexed import build_gpt_datasets, collate
    from dms_megatron.megatron.distributed import destroy_process_groups, init_process_groups
    from dms_megatron.megatron.model import build_gpt_model
    from dms_megatron.training.checkpointing import save_checkpoint
    from dms_megatron.training.evaluation import greedy_predict_fn, lm_loss
    from dms_megatron.data.recall import score_recall

    import torch.distributed as dist

    owns_pg = not dist.is_initialized()
    if owns_pg:
        init_process_groups(1, 1, seed=r.seed)
    try:
        torch.manual_seed(r.seed)
        model = build_gpt_model(TINY_MODEL, None, seq_length=SEQ_LENGTH)
        train, valid = build_gpt_datasets(root / "data" / "train", root / "data" / "valid", SEQ_LENGTH, r.seed,
                                          r.pretrain_steps * r.batch_size, 64, tok.eos_token_id,
                                          tok.pad_token_id, len(tok), cache_dir=str(root / "data" / "cache"))
        opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.95), weight_decay=0.01)
        vocab = TINY_MODEL.vocab_size
        t0 = time.time()
        for step in range(r.pretrain_steps):
            lr = r.lr * min(1.0, (step + 1) / r.warmup)
            if step >= r.warmup:
                prog = (step - r.warmup) / max(1, r.pretrain_steps - r.warmup)
                lr = r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * prog))
            for g in opt.param_groups:
                g["lr"] = lr
            if step < r.warm_steps:
                batch = warm_batch(step)
            else:
                batch = collate([train[step * r.batch_size + i] for i in range(r.batch_size)])
            weights = answer_weights(batch["tokens"], batch["loss_mask"], task, r.answer_loss_weight)
            loss = lm_loss(model(batch["tokens"], batch["position_ids"], None)[..., :vocab], batch["labels"],
                           weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if not quiet and (step + 1) % 50 == 0:
                model.eval()
                acc = score_recall(greedy_predict_fn(model, vocab), root / "recall_eval.jsonl", limit=64)
                model.train()
                _log(quiet, f"step {step + 1:4d} loss {loss.item():.3f} recall@64 {acc:.2f} ({time.time() - t0:.0f}s)")
        model.eval()
        with torch.no_grad():
            vb = collate([valid[i] for i in range(64)])
            vloss = lm_loss(model(vb["tokens"], vb["position_ids"], None)[..., :vocab], vb["labels"],
                            vb["loss_mask"]).item()
            acc = score_recall(greedy_predict_fn(model, vocab), root / "recall_eval.jsonl")
        save_checkpoint(root / "teacher", 0, model, extra={"model_config": asdict(TINY_MODEL), "dms_config": None})
        return {"teacher_recall_acc": acc, "teacher_valid_loss": vloss, "pretrain_seconds": round(time.time() - t0, 1)}
    finally:
        if owns_pg:
            destroy_process_groups()

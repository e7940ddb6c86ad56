"""Build the embedded tiny teacher's assets: tokenizer, held-out recall items and text, pre-trained weights in Hugging
Face format, build record and checksums. Written to a temporary sibling directory and renamed into place at the end:
an interrupted or failed build leaves the previous assets (or nothing) behind.

  python tools/build_tiny_teacher.py [--out DIR] [--device cpu|cuda] [--steps N]
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Callable, List, Optional

import megatron.core
import torch

from dms_megatron.convert.workflows import build_hf_config, export_tensors
from dms_megatron.data.corpus import stdlib_texts
from dms_megatron.data.embedded import HELDOUT_CHARS, TEXT_CHARS, checksums_of, heldout_file, text_ids, write_checksums
from dms_megatron.data.recall import TASKS, ChainSpec, filler_from, make_task, write_items
from dms_megatron.data.tokenizer import train_tokenizer
from dms_megatron.megatron.distributed import destroy_process_groups, init_process_groups
from dms_megatron.progress import signals_deferred
from dms_megatron.training.pretrain import PretrainRecipe, pretrain

EVAL_ITEMS = 200
KL_SEQUENCES = 16


def heldout_items(tok, stream: List[int], task_name: str, count: int, length: int, seed: int) -> List[dict]:
    """``count`` recall items of a task, ``length`` tokens each, with filler from the held-out text."""
    rng = random.Random(seed)
    task, filler = make_task(tok, task_name), filler_from(stream)(rng)
    return [task.item(rng, filler, length) for _ in range(count)]


def heldout_text_spans(stream: List[int], count: int, length: int, seed: int) -> List[List[int]]:
    """``count`` random spans of ``length`` tokens of the held-out text (the KL's reference text)."""
    rng = random.Random(seed)
    return [stream[i:i + length] for i in (rng.randrange(len(stream) - length) for _ in range(count))]


def _write_heldout(out: Path, tok, recipe: PretrainRecipe, count: int) -> dict:
    stream = text_ids(tok, "heldout", HELDOUT_CHARS)
    heldout_file(out, "text").parent.mkdir()
    evals = {}
    for i, name in enumerate(TASKS):
        # chained-recall items end early enough for a generated continuation (the hyper-scaling length budget)
        length = TASKS[name].longest() if isinstance(TASKS[name], ChainSpec) else recipe.seq_length
        evals[name] = heldout_items(tok, stream, name, count, length, recipe.seed + 100 + i)
        write_items(heldout_file(out, name), evals[name])
    seqs = heldout_text_spans(stream, KL_SEQUENCES, recipe.seq_length, recipe.seed + 200)
    heldout_file(out, "text").write_text(json.dumps({"sequences": seqs}))
    return evals


def _export(model, tok, recipe: PretrainRecipe, out: Path) -> None:
    config = build_hf_config(recipe.model, None, "plain", "float32", None)
    config.update(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    export_tensors(model.cpu(), recipe.model, None, "plain", out, torch.float32, max_shard_bytes=1 << 30)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_teacher_assets(out: Path, recipe: PretrainRecipe, device: torch.device,
                         log: Callable[[str], None] = print, eval_items: int = EVAL_ITEMS,
                         progress: Optional[Path] = None) -> dict:
    """Everything the embedded default ships, into the teacher dir ``out`` and its checksums ``<out>.sha256``
    (replaced only once complete). Returns the build record. ``progress``: a file the pre-training saves its state
    to every evaluation and resumes from (removed once the build is complete)."""
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    try:
        texts = list(stdlib_texts(TEXT_CHARS, split="train"))
        tok = train_tokenizer(texts, recipe.model.vocab_size, tmp)
        evals = _write_heldout(tmp, tok, recipe, eval_items)
        log(f"tokenizer + held-out items ready ({time.time() - t0:.0f} s); pre-training {recipe.steps} steps on "
            f"{device}")
        try:
            with signals_deferred():  # a Ctrl-C arriving here waits until the groups exist, then cleans up
                init_process_groups(1, 1, seed=recipe.seed)
            model, history = pretrain(recipe, tok, text_ids(tok, "train", TEXT_CHARS), evals, device, log=log,
                                      progress=progress)
        finally:
            destroy_process_groups()
        _export(model, tok, recipe, tmp)
        record = {"recipe": dataclasses.asdict(recipe), "history": history, "final": history[-1],
                  "seconds": round(time.time() - t0, 1), "device": str(device), "torch": torch.__version__,
                  "megatron_core": megatron.core.__version__, "python": platform.python_version()}
        (tmp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        sums = write_checksums(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        os.replace(sums, checksums_of(out))
        if progress is not None:
            Path(progress).unlink(missing_ok=True)
        return record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        checksums_of(tmp).unlink(missing_ok=True)


__all__ = ["build_teacher_assets", "heldout_items", "heldout_text_spans"]

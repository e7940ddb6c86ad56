"""Megatron indexed datasets (.bin/.idx) and megatron-core GPT datasets over them (packing, EOS/pad masks)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from dms_megatron.config.blend import DataBlend
from dms_megatron.data.tokenizer import MegatronTokenizerAdapter


class IndexedWriter:
    """Documents (token-id lists) into ``prefix.bin`` / ``prefix.idx``, Megatron's indexed format (uint16 ids below a
    vocabulary of 65,500, int32 above, as Megatron-LM picks), written under temporary names that ``finalize`` renames
    into place: a failed run leaves no half-written dataset (``discard`` removes its parts)."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = str(prefix)
        self._tmp = f"{self.prefix}.tmp-{os.getpid()}"
        self._builder = IndexedDatasetBuilder(self._tmp + ".bin", dtype=np.uint16 if vocab_size < 65500 else np.int32)
        self.documents = 0

    def add(self, doc: Sequence[int]) -> None:
        if len(doc):
            self._builder.add_document(doc, [len(doc)])
            self.documents += 1

    def finalize(self) -> int:
        if self.documents == 0:
            self.discard()
            raise ValueError(f"no non-empty documents were written to {self.prefix}.bin")
        self._builder.finalize(self._tmp + ".idx")
        for ext in (".bin", ".idx"):
            os.replace(self._tmp + ext, self.prefix + ext)
        return self.documents

    def discard(self) -> None:
        self._builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(self._tmp + ext).unlink(missing_ok=True)


def write_indexed(prefix: str | Path, documents: Iterable[Sequence[int]], vocab_size: int) -> int:
    """Write token-id documents to ``prefix.bin`` / ``prefix.idx``; returns the number of documents."""
    w = IndexedWriter(prefix, vocab_size)
    try:
        for doc in documents:
            w.add(list(doc))
    except BaseException:
        w.discard()
        raise
    return w.finalize()


def check_prefix(prefix: str | Path, what: str = "data prefix") -> str:
    p = str(prefix)
    for ext in (".bin", ".idx"):
        if not Path(p + ext).is_file():
            raise FileNotFoundError(f"{what} {p}: {p + ext} does not exist (build it with tools/preprocess_data.py)")
    return p


def max_token_id(prefix: str | Path) -> int:
    """Largest token id stored in an indexed dataset (to check it against the model's vocabulary): one vectorised
    pass over the memory-mapped .bin (about a GB/s), remembered per file version within a process (the launcher's
    pre-flight and its run both ask)."""
    prefix = check_prefix(prefix)
    st = Path(f"{prefix}.bin").stat()
    return _max_token_id(str(prefix), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _max_token_id(prefix: str, size: int, mtime_ns: int) -> int:
    dtype = IndexedDataset(prefix).index.dtype
    data = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    chunk = 1 << 26
    return max((int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)), default=0)


def build_gpt_datasets(data: DataBlend, seq_length: int, seed: int, num_train_samples: int,
                       num_valid_samples: int, eos_id: int, pad_id: int, vocab_size: int,
                       cache_dir: Optional[str] = None):
    """megatron-core GPTDatasets (train, valid) packing documents into ``seq_length`` windows, built by its
    ``BlendedMegatronDatasetBuilder`` from ``data``: one weighted blend divided by its split, or a blend per split
    (a blend of several datasets draws each sample from a dataset in proportion to the weights).

    Items are dicts with tokens, labels, loss_mask (0 on padding and on predictions made from EOS),
    position_ids. ``cache_dir`` holds megatron's index caches (default: beside the first dataset).
    """
    prefixes = [check_prefix(p, "data prefix") for p in data.prefixes()]
    if data.blend is not None:
        where = dict(blend=data.blend, split=data.split)
    else:
        where = dict(blend_per_split=[data.train, data.valid, None])
    cfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=MegatronTokenizerAdapter(eos_id, pad_id, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=True,
        create_attention_mask=False,
        path_to_cache=cache_dir or str(Path(prefixes[0]).parent / "index-cache"),
        mmap_bin_files=True,
        **where,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, num_valid_samples, num_valid_samples if data.blend else None], lambda: True,
        cfg
    ).build()
    return train, valid


def collate(items: List[dict]) -> dict:
    """Stack GPTDataset items into a batch of [b, s] tensors."""
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in keys}

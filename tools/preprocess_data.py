#!/usr/bin/env python
"""Tokenize JSONL / parquet / text into Megatron indexed datasets (PREFIX.bin + PREFIX.idx), in worker processes.

  python tools/preprocess_data.py --input data.jsonl --tokenizer TOKENIZER_DIR --output-prefix out/train --workers 4
  python tools/preprocess_data.py --input chats.jsonl --chat-template --tokenizer TOKENIZER_DIR --output-prefix out/sft
  python tools/preprocess_data.py --input a.parquet --json-keys text title --tokenizer TOKENIZER_DIR --output-prefix o

Each JSONL line / parquet row (or each text file) is one document. The flags are Megatron-LM's: ``--json-keys``
(one dataset per key; with several, ``PREFIX_<key>_document`` as Megatron-LM names them), ``--workers`` (tokenization
in N processes; the output is in input order and the same bytes for any N), ``--append-eod`` (on by default here:
the trainer masks predictions made from EOS, so packed sequences keep document boundaries; ``--no-append-eod``
turns it off), ``--log-interval``. ``--chat-template`` renders each record's ``messages`` list (role / content
dicts) with the tokenizer's own chat template before tokenizing it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterator, List, Tuple

from dms_megatron.data.indexed import IndexedWriter
from dms_megatron.data.tokenizer import load_tokenizer
from dms_megatron.progress import fmt_duration, rate_and_left, say

BATCH = 64  # documents per task handed to a worker

_TOK = None  # each worker's tokenizer


def _read_jsonl(path: Path, keys: List[str]) -> Iterator[Tuple[int, list]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                yield len(line), None
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            missing = [k for k in keys if k not in obj]
            if missing:
                raise KeyError(f"{path}:{n}: no key {missing[0]!r} (keys: {sorted(obj)[:8]}); set --json-keys")
            yield len(line), [obj[k] for k in keys]


def _read_parquet(path: Path, keys: List[str]) -> Iterator[Tuple[int, list]]:
    try:
        import pyarrow.parquet as pq  # optional: only parquet input needs it
    except ImportError:
        raise ValueError(f"{path}: parquet input needs pyarrow (pip install pyarrow)") from None
    f = pq.ParquetFile(path)
    missing = [k for k in keys if k not in f.schema_arrow.names]
    if missing:
        raise KeyError(f"{path}: no column {missing[0]!r} (columns: {f.schema_arrow.names[:8]}); set --json-keys")
    per_row = path.stat().st_size / max(1, f.metadata.num_rows)
    for batch in f.iter_batches(columns=keys):
        cols = [batch.column(k).to_pylist() for k in keys]
        for row in zip(*cols):
            yield per_row, list(row)


def iter_records(paths, keys: List[str]) -> Iterator[Tuple[int, list]]:
    """(input bytes consumed, one value per key or None for a blank line) for every document of ``paths``."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        if path.suffix in (".jsonl", ".json"):
            yield from _read_jsonl(path, keys)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path, keys)
        else:
            yield path.stat().st_size, [path.read_text(encoding="utf-8", errors="replace")]


def _init_worker(tokenizer: str, chat: bool, append_eod: bool, pooled: bool = True) -> None:
    global _TOK
    if pooled:  # the workers are the parallelism: no tokenizer threads on top (one process alone keeps them)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK = (load_tokenizer(tokenizer), chat, append_eod)


def encode(records: List[list]) -> List[List[List[int]]]:
    """Token ids per record and key (in a worker): text as is, a ``messages`` list through the chat template."""
    tok, chat, append_eod = _TOK
    out = []
    for values in records:
        ids = []
        for v in values:
            text = tok.apply_chat_template(v, tokenize=False) if chat else v
            if not isinstance(text, str):
                raise ValueError(f"expected text, found {type(v).__name__} (a messages list needs --chat-template)")
            doc = tok(text, add_special_tokens=False)["input_ids"]
            ids.append(doc + [tok.eos_token_id] if append_eod else doc)
        out.append(ids)
    return out


def _batches(records, sizes: list):
    while True:
        chunk = list(itertools.islice(((b, v) for b, v in records if v is not None), BATCH))
        if not chunk:
            return
        sizes.append(sum(b for b, _ in chunk))
        yield [v for _, v in chunk]


def tokenize(args, keys: List[str], writers: List[IndexedWriter]) -> Tuple[int, int]:
    """Tokenize every input document into ``writers`` (one per key), in order; returns (documents, tokens)."""
    total = sum(Path(p).stat().st_size for p in args.input if Path(p).is_file())
    sizes: list = []
    batches = _batches(iter_records(args.input, keys), sizes)
    init = (args.tokenizer, args.chat_template, args.append_eod)
    if args.workers > 1:
        pool = multiprocessing.get_context("fork").Pool(args.workers, _init_worker, init)  # no re-imports
        results = pool.imap(encode, batches)
    else:
        pool = None
        _init_worker(*init, pooled=False)
        results = map(encode, batches)
    docs = tokens = 0
    start, next_log = time.monotonic(), args.log_interval
    try:
        for i, batch in enumerate(results):
            for ids in batch:
                for w, doc in zip(writers, ids):
                    w.add(doc)
                tokens += sum(map(len, ids))
            docs += len(batch)
            if docs >= next_log:
                next_log += args.log_interval
                rate, left = rate_and_left(sum(sizes[: i + 1]), total, time.monotonic() - start)
                say(f"processed {docs:,} documents ({tokens / (time.monotonic() - start):,.0f} tokens/s, "
                    f"{rate / 2**20:.1f} MB/s), {fmt_duration(left)} left")
    finally:
        if pool is not None:
            pool.terminate()
    args.elapsed = time.monotonic() - start
    return docs, tokens


def _output_prefixes(prefix: str, keys: List[str]) -> List[Path]:
    return [Path(prefix)] if len(keys) == 1 else [Path(f"{prefix}_{k}_document") for k in keys]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, help=".jsonl/.json (one document per line), .parquet, or "
                                                              "text files (one document each)")
    ap.add_argument("--json-keys", "--json-key", nargs="+", default=None, dest="json_keys",
                    help="keys (columns) to tokenize, one dataset each (default: text; messages with "
                         "--chat-template)")
    ap.add_argument("--chat-template", action="store_true",
                    help="render each record's messages list with the tokenizer's chat template")
    ap.add_argument("--tokenizer", "--tokenizer-model", required=True, dest="tokenizer",
                    help="Hugging Face tokenizer directory")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    ap.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                    help="an EOS token after every document (default: on)")
    ap.add_argument("--log-interval", type=int, default=1000, help="a progress line every this many documents")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="model vocabulary size: refuse a tokenizer with more tokens than this")
    args = ap.parse_args(argv)
    keys = args.json_keys or (["messages"] if args.chat_template else ["text"])
    try:
        if args.workers < 1 or args.log_interval < 1:
            raise ValueError(f"--workers {args.workers} / --log-interval {args.log_interval}: must be >= 1")
        tok = load_tokenizer(args.tokenizer)
        if args.vocab_size is not None and len(tok) > args.vocab_size:
            raise ValueError(f"tokenizer {args.tokenizer} has {len(tok)} tokens > --vocab-size {args.vocab_size}: "
                             f"tokenizer/model vocabulary mismatch")
        if args.chat_template and not tok.chat_template:
            raise ValueError(f"tokenizer {args.tokenizer} has no chat template (tokenizer_config.json "
                             f"chat_template); drop --chat-template or use the model's own tokenizer")
        outs = _output_prefixes(args.output_prefix, keys)
        outs[0].parent.mkdir(parents=True, exist_ok=True)
        writers = [IndexedWriter(o, len(tok)) for o in outs]
        try:
            docs, tokens = tokenize(args, keys, writers)
        except BaseException:
            for w in writers:
                w.discard()
            raise
        for w in writers:
            w.finalize()
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    say(f"wrote {docs} documents ({tokens:,} tokens, {tokens / max(args.elapsed, 1e-9):,.0f} tokens/s) to "
        f"{', '.join(f'{o}.bin / {o}.idx' for o in outs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

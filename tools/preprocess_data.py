#!/usr/bin/env python
"""Tokenize text / JSONL into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

  python tools/preprocess_data.py --input data.jsonl --json-key text --tokenizer TOKENIZER_DIR --output-prefix out/train
  python tools/preprocess_data.py --input a.txt b.txt --tokenizer TOKENIZER_DIR --output-prefix out/train

Each JSONL line (or each text file) is one document; an EOS token is appended to every document so packed
sequences keep document boundaries (the trainer masks predictions made from EOS).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dms_megatron.data.indexed import write_indexed
from dms_megatron.data.tokenizer import load_tokenizer


def iter_documents(paths, json_key):
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                    if json_key not in obj:
                        raise KeyError(f"{path}:{n}: no key {json_key!r} (keys: {sorted(obj)[:8]}); set --json-key")
                    yield obj[json_key]
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, help=".jsonl/.json (one document per line) or text files")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="model vocabulary size: refuse a tokenizer with more tokens than this")
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer)
        if args.vocab_size is not None and len(tok) > args.vocab_size:
            raise ValueError(f"tokenizer {args.tokenizer} has {len(tok)} tokens > --vocab-size {args.vocab_size}: "
                             f"tokenizer/model vocabulary mismatch")
        out = Path(args.output_prefix)
        out.parent.mkdir(parents=True, exist_ok=True)
        eos = tok.eos_token_id
        docs = (tok(text, add_special_tokens=False)["input_ids"] + [eos] for text in iter_documents(args.input,
                                                                                                     args.json_key))
        n = write_indexed(out, docs, len(tok))
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"wrote {n} documents to {out}.bin / {out}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())

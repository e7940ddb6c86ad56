"""Synthetic long-range recall: key -> value pairs stated early must be recalled after a long filler.

Token layout of one example (all task symbols are single special tokens):
  <|kv|> k_a v v  k_b v v  ... (pairs) | filler (plain text tokens) | <|q|> k_b v v ... <|eos|>
The pairs sit far more than a DMS window before the question, so a model that keeps only recent tokens fails.
The answer directly follows the repeated key (an induction pattern: "what came after this key last time"), which a
small model learns within a few hundred steps.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from dms_megatron.data.tokenizer import EOS, KV, NUM_KEYS, NUM_VALUES, QUERY


@dataclass
class RecallSpec:
    num_pairs: int = 4
    value_len: int = 2
    num_queries: int = 2
    key_pool: int = 16  # keys are drawn from the first key_pool key symbols (1 = a fixed marker key)


def _ids(tok, names: Sequence[str]) -> List[int]:
    ids = tok.convert_tokens_to_ids(list(names))
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ValueError("tokenizer lacks the recall task's special tokens; rebuild it with train_tokenizer")
    return ids


class RecallTask:
    """Generates recall examples as token ids from a tokenizer that has the task's special tokens."""

    def __init__(self, tok, spec: RecallSpec = RecallSpec()):
        self.spec = spec
        self.kv, self.q, self.eos = _ids(tok, [KV, QUERY, EOS])
        self.keys = _ids(tok, [f"<|k{i}|>" for i in range(NUM_KEYS)])
        self.values = _ids(tok, [f"<|v{i}|>" for i in range(NUM_VALUES)])

    def example(self, rng: random.Random, filler: Sequence[int], prefix: Sequence[int] = ()):
        """Returns (tokens of the whole example incl. answers and EOS, list of (prompt_len, answer ids)).

        ``prefix`` (plain text) goes before the pair block, so the pairs are not at a fixed position (attention
        sinks / "keep the first tokens" policies get no free answer)."""
        s = self.spec
        keys = rng.sample(self.keys[:s.key_pool], s.num_pairs)
        vals = {k: [rng.choice(self.values) for _ in range(s.value_len)] for k in keys}
        toks = list(prefix) + [self.kv]
        for k in keys:
            toks += [k] + vals[k]
        toks += list(filler)
        answers = []
        for k in rng.sample(keys, min(s.num_queries, len(keys))):
            toks += [self.q, k]
            answers.append((len(toks), vals[k]))
            toks += vals[k]
        toks.append(self.eos)
        return toks, answers

    def eval_item(self, rng: random.Random, filler: Sequence[int], prefix: Sequence[int] = ()):
        """One held-out question: {"prompt_ids": [... <|q|> key], "answer_ids": [values]} (first query only)."""
        toks, answers = self.example(rng, filler, prefix)
        plen, ans = answers[0]
        return {"prompt_ids": toks[:plen], "answer_ids": ans}


def write_eval(path: str | Path, items: List[dict]) -> None:
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")


def read_eval(path: str | Path, limit: Optional[int] = None) -> List[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recall eval file {p} does not exist")
    items = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return items[:limit] if limit else items


def score_recall(predict_fn: Callable[[List[List[int]], int], List[List[int]]], eval_path, limit=None) -> float:
    """Exact-match accuracy. ``predict_fn(prompts, n)`` greedy-decodes n tokens for a batch of prompts."""
    items = read_eval(eval_path, limit)
    if not items:
        raise ValueError(f"recall eval file {eval_path} is empty")
    n = len(items[0]["answer_ids"])
    preds = predict_fn([it["prompt_ids"] for it in items], n)
    return sum(p == it["answer_ids"] for p, it in zip(preds, items)) / len(items)

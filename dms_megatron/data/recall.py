"""Synthetic long-range recall tasks, stated among natural filler text, scored at every answer position.

Multi-query associative recall ("mqar", the default): several key -> value pairs, each stated as
``<|kv|> key value`` at a random place in the filler, then questions ``<|q|> key value`` for every stated key in a
random order. Keys are distinct symbols drawn from the key pool, values distinct symbols drawn from the value pool,
so neither a position nor a token type gives an answer away: a model must match the question's key against the
statements (an induction pattern: "what came after this key last time") and a cache must still hold them.

  prefix filler | <|kv|> k_a v_a  filler | <|kv|> k_b v_b  filler | ... | tail filler | <|q|> k_b v_b <|q|> k_a v_a ...

"single": one statement ``<|kv|> <|k0|> value`` (a fixed marker key) recalled after a long filler; the answer is the
only value symbol in the context, so a model can find it by token type alone.

"chain" (chained recall with written hops, the hyper-scaling task): statements ``<|kv|> a b`` whose targets are keys
themselves, forming a chain ``c0 -> c1 -> ... -> c_{n-1} -> value`` and a distractor chain of other keys ending in
another value, stated in a random order among filler. The question ``<|q|> c0`` is answered by writing every
intermediate key and then the value: n answer tokens for n hops, each needing the statement whose source is the
token just written (so a cache must still hold every link), and a length budget below n cuts the chain off.

  filler | <|kv|> c1 c2  filler | <|kv|> d0 d1  filler | <|kv|> c0 c1 ... | tail | <|q|> c0 c1 c2 ... v

An example is a token list plus its answer positions: ``ids[p]`` is an answer, predicted from ``ids[:p]``. Held-out
items (``write_items`` / ``read_items``) are JSON lines {"ids": [...], "answers": [p, ...]}, all of one length and
ending with their last answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from dms_megatron.data.tokenizer import EOS, KV, NUM_KEYS, NUM_VALUES, QUERY

Filler = Callable[[int], List[int]]  # n -> n plain-text token ids


@dataclass(frozen=True)
class RecallSpec:
    """Shape of one example; each (lo, hi) is drawn uniformly per example (inclusive)."""

    pairs: Tuple[int, int] = (4, 6)
    key_pool: int = NUM_KEYS  # keys come from the first key_pool key symbols (1 = the fixed marker key <|k0|>)
    gap: Tuple[int, int] = (6, 22)  # filler after each statement
    tail: Tuple[int, int] = (32, 60)  # more filler between the last statement and the first question
    prefix: Tuple[int, int] = (0, 24)  # filler before the first statement

    def __post_init__(self) -> None:
        for name in ("pairs", "gap", "tail", "prefix"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"RecallSpec.{name}={(lo, hi)} must satisfy 0 <= lo <= hi")
        if not (1 <= self.pairs[0] and self.pairs[1] <= min(self.key_pool, NUM_VALUES)):
            raise ValueError(f"RecallSpec.pairs={self.pairs} must lie in [1, min(key_pool, {NUM_VALUES} values)]")

    def longest(self) -> int:
        """Upper bound of an example's length in tokens (256 for the default: every example fits the model)."""
        n = self.pairs[1]
        return self.prefix[1] + n * (3 + self.gap[1]) + self.tail[1] + 3 * n


@dataclass(frozen=True)
class ChainSpec:
    """Shape of a chained-recall example; each (lo, hi) is drawn uniformly per example (inclusive)."""

    hops: Tuple[int, int] = (1, 6)  # statements from the start key to its value (= answer tokens)
    distractor: Tuple[int, int] = (2, 6)  # statements of the distractor chain
    gap: Tuple[int, int] = (4, 12)
    tail: Tuple[int, int] = (16, 40)
    prefix: Tuple[int, int] = (0, 16)

    def __post_init__(self) -> None:
        for name in ("hops", "distractor", "gap", "tail", "prefix"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"ChainSpec.{name}={(lo, hi)} must satisfy 0 <= lo <= hi")
        if self.hops[0] < 1 or self.distractor[0] < 1 or self.hops[1] + self.distractor[1] > NUM_KEYS:
            raise ValueError(f"ChainSpec: hops {self.hops} and distractor {self.distractor} need at least one "
                             f"statement each and at most {NUM_KEYS} keys together")

    def longest(self) -> int:
        """Upper bound of an example's length in tokens (232 for the default)."""
        n = self.hops[1] + self.distractor[1]
        return self.prefix[1] + n * 3 + (n - 1) * self.gap[1] + self.tail[1] + 2 + self.hops[1]


TASKS: Dict[str, "RecallSpec | ChainSpec"] = {
    "mqar": RecallSpec(),
    "single": RecallSpec(pairs=(1, 1), key_pool=1, gap=(0, 0), tail=(40, 160), prefix=(0, 60)),
    "chain": ChainSpec(),
}


def _ids(tok, names: Sequence[str]) -> List[int]:
    ids = tok.convert_tokens_to_ids(list(names))
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ValueError("tokenizer lacks the recall task's special tokens; rebuild it with train_tokenizer")
    return ids


class RecallTask:
    """Generates recall examples as token ids from a tokenizer that has the task's special tokens."""

    def __init__(self, tok, spec: RecallSpec = TASKS["mqar"]):
        if not isinstance(spec, RecallSpec):
            raise TypeError(f"RecallTask takes a RecallSpec, not {type(spec).__name__}; use make_task")
        self.spec = spec
        self.kv, self.q, self.eos = _ids(tok, [KV, QUERY, EOS])
        self.keys = _ids(tok, [f"<|k{i}|>" for i in range(NUM_KEYS)])
        self.values = _ids(tok, [f"<|v{i}|>" for i in range(NUM_VALUES)])

    def example(self, rng: random.Random, filler: Filler, spec: Optional[RecallSpec] = None):
        """(tokens, answer positions) of one example; ``spec`` overrides the task's (e.g. a curriculum stage)."""
        s = spec or self.spec
        n = rng.randint(*s.pairs)
        keys = rng.sample(self.keys[:s.key_pool], n)
        values = rng.sample(self.values, n)
        toks = filler(rng.randint(*s.prefix))
        for k, v in zip(keys, values):
            toks += [self.kv, k, v] + filler(rng.randint(*s.gap))
        toks += filler(rng.randint(*s.tail))
        answers = []
        for j in rng.sample(range(n), n):
            toks += [self.q, keys[j]]
            answers.append(len(toks))
            toks.append(values[j])
        return toks, answers

    def document(self, rng: random.Random, filler: Filler, length: int, spec: Optional[RecallSpec] = None,
                 at_start: bool = False):
        """An example inside exactly ``length`` tokens of filler (a random share before it, the rest after; all after
        when ``at_start``), or cut to ``length`` (answers past the cut are dropped). Returns (tokens, answers)."""
        toks, answers = self.example(rng, filler, spec)
        front = 0 if at_start else rng.randint(0, max(0, length - len(toks)))
        toks = filler(front) + toks
        toks += filler(length - len(toks))
        return toks[:length], [a + front for a in answers if a + front < length]

    def item(self, rng: random.Random, filler: Filler, length: int) -> dict:
        """A held-out item of exactly ``length`` tokens ending with its last answer (filler in front), so items of
        one length stream together: {"ids", "answers"}."""
        toks, answers = self.example(rng, filler)
        if len(toks) > length:
            raise ValueError(f"a recall example of {len(toks)} tokens does not fit {length}")
        front = length - len(toks)
        return {"ids": filler(front) + toks, "answers": [a + front for a in answers]}


class ChainTask(RecallTask):
    """Chained-recall examples (``ChainSpec``); documents and items as for ``RecallTask``. An item's answers are its
    hops: ``ids[answers[0] - 1]`` is the start key, ``ids[answers[-1]]`` the final value."""

    def __init__(self, tok, spec: ChainSpec = TASKS["chain"]):
        super().__init__(tok, RecallSpec())
        self.spec = spec

    def example(self, rng: random.Random, filler: Filler, spec: Optional[ChainSpec] = None):
        s = spec or self.spec
        n, m = rng.randint(*s.hops), rng.randint(*s.distractor)
        keys = rng.sample(self.keys, n + m)
        v_main, v_other = rng.sample(self.values, 2)
        chain, other = keys[:n] + [v_main], keys[n:] + [v_other]
        links = [(a, b) for c in (chain, other) for a, b in zip(c, c[1:])]
        rng.shuffle(links)
        toks = filler(rng.randint(*s.prefix))
        for j, (a, b) in enumerate(links):
            toks += [self.kv, a, b]
            if j + 1 < len(links):
                toks += filler(rng.randint(*s.gap))
        toks += filler(rng.randint(*s.tail)) + [self.q, chain[0]]
        answers = list(range(len(toks), len(toks) + n))
        return toks + chain[1:], answers


    def item(self, rng: random.Random, filler: Filler, length: int) -> dict:
        """A held-out item of exactly ``length`` tokens whose prompt (up to and including the start key) always ends
        at ``length - hops_max``, so the prompts of all items have one length: filler, the example, its hops, then
        filler. {"ids", "answers"}."""
        toks, answers = self.example(rng, filler)
        prompt = length - self.spec.hops[1]
        front = prompt - answers[0]
        if front < 0:
            raise ValueError(f"a chained-recall example with a prompt of {answers[0]} tokens does not fit {length}")
        ids = filler(front) + toks
        return {"ids": ids + filler(length - len(ids)), "answers": [a + front for a in answers]}


def make_task(tok, name: str) -> RecallTask:
    """The task object of a named task in ``TASKS``."""
    spec = TASKS[name]
    return ChainTask(tok, spec) if isinstance(spec, ChainSpec) else RecallTask(tok, spec)


def filler_from(tokens: Sequence[int]) -> Callable[[random.Random], Filler]:
    """``filler_from(text_ids)(rng)`` -> a Filler drawing random contiguous spans of ``text_ids``."""
    def make(rng: random.Random) -> Filler:
        def filler(n: int) -> List[int]:
            if n <= 0:
                return []
            if n >= len(tokens):
                raise ValueError(f"filler of {n} tokens asked from a text of {len(tokens)} tokens")
            i = rng.randrange(len(tokens) - n)
            return list(tokens[i:i + n])
        return filler
    return make


def write_items(path, items: List[dict]) -> None:
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")


def read_items(path, limit: Optional[int] = None) -> List[dict]:
    """Held-out recall items {"ids", "answers"}; one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recall items file {p} does not exist")
    items = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            it = json.loads(line)
            ok = isinstance(it["ids"], list) and all(0 < a < len(it["ids"]) for a in it["answers"])
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{p}:{n}: not a recall item {{\"ids\": [...], \"answers\": [positions]}}")
        items.append(it)
    if not items:
        raise ValueError(f"recall items file {p} is empty")
    return items[:limit] if limit else items


def answer_accuracy(items: List[dict], predictions: List[List[int]]) -> float:
    """Fraction of answers predicted: ``predictions[i][p - 1]`` is the prediction for ``items[i]["ids"][p]``."""
    hits = total = 0
    for it, pred in zip(items, predictions):
        for p in it["answers"]:
            hits += int(pred[p - 1] == it["ids"][p])
            total += 1
    if total == 0:
        raise ValueError("recall items hold no answers")
    return hits / total


__all__ = ["RecallSpec", "RecallTask", "ChainSpec", "ChainTask", "make_task", "TASKS", "filler_from", "write_items", "read_items", "answer_accuracy"]

"""Tokenizer, preprocess_data CLI, GPT dataset masks, recall task generation and scoring."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOK_VOCAB = 300


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from dms_megatron.data.corpus import stdlib_texts
    from dms_megatron.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(list(stdlib_texts(100_000, chunk_chars=1000)), TOK_VOCAB, d)
    return d


def test_tokenizer_round_trip_and_specials(tok):
    from dms_megatron.data.tokenizer import load_tokenizer, recall_special_tokens

    t = load_tokenizer(tok)
    text = "def f(x):\n    return x + 1  # ünïcode\n"
    assert t.decode(t(text)["input_ids"]) == text
    ids = t.convert_tokens_to_ids(recall_special_tokens())
    assert len(set(ids)) == len(ids) and t.unk_token_id not in ids
    assert t.eos_token_id is not None and t.pad_token_id is not None


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_preprocess_jsonl_reads_back_the_same_ids(tok, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    docs = ["hello world", "import os\nprint(os.sep)", "x" * 50]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    r = _cli("--input", src, "--json-key", "content", "--tokenizer", tok, "--output-prefix", tmp_path / "out" / "d")
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(str(tmp_path / "out" / "d"))
    ref = AutoTokenizer.from_pretrained(str(tok))  # independent tokenization
    assert len(ds) == len(docs)
    for i, d in enumerate(docs):
        assert ds[i].tolist() == ref(d, add_special_tokens=False)["input_ids"] + [ref.eos_token_id]


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("badjson", "invalid JSON"),
    ("badkey", "no key 'text'"),
    ("vocab", "tokenizer/model vocabulary mismatch"),
])
def test_preprocess_errors(tok, tmp_path, case, needle):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n' if case != "badjson" else '{"text": \n')
    if case == "badkey":
        src.write_text('{"body": "a"}\n')
    args = ["--input", tmp_path / "nope.jsonl" if case == "missing" else src, "--tokenizer", tok,
            "--output-prefix", tmp_path / "o"]
    if case == "vocab":
        args += ["--vocab-size", 100]
    r = _cli(*args)
    last = r.stderr.strip().splitlines()[-1]  # (library warnings may precede it)
    assert r.returncode == 2 and last.startswith("error: ") and needle in last


def test_gpt_dataset_masks_eos_predictions(tmp_path):
    from dms_megatron.data.indexed import build_gpt_datasets, write_indexed

    eos, pad = 0, 1
    docs = [[5, 6, 7, eos], [8, 9, eos], [10, 11, 12, 13, eos]] * 20
    write_indexed(tmp_path / "t", docs, 32)
    write_indexed(tmp_path / "v", docs, 32)
    train, _ = build_gpt_datasets(tmp_path / "t", tmp_path / "v", 8, 0, 10, 2, eos, pad, 32)
    for i in range(5):
        it = train[i]
        toks, labels, mask = it["tokens"].tolist(), it["labels"].tolist(), it["loss_mask"].tolist()
        assert labels[:-1] == toks[1:]  # next-token labels of one packed window
        for t, m in zip(toks, mask):  # predictions made from EOS are excluded, all others kept
            assert m == (0.0 if t == eos else 1.0)


def test_recall_examples_state_each_answer_once(tok):
    from dms_megatron.data.recall import RecallSpec, RecallTask
    from dms_megatron.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    task = RecallTask(t, RecallSpec(num_pairs=4, value_len=2, num_queries=2))
    filler = list(range(40, 80))
    a = task.example(random.Random(3), filler)
    assert a == task.example(random.Random(3), filler)  # deterministic
    toks, answers = a
    kv_end = 1 + 4 * 3
    for plen, ans in answers:
        key = toks[plen - 1]
        pos = toks.index(key)  # the key's statement in the pair block
        assert pos < kv_end and toks[pos + 1:pos + 3] == ans and toks[kv_end:kv_end + len(filler)] == filler
        assert toks.count(key) == 2  # stated once, asked once
    item = task.eval_item(random.Random(4), filler)
    assert item["prompt_ids"][-2] == task.q and item["prompt_ids"][-1] in task.keys
    assert len(item["answer_ids"]) == 2


def test_score_recall_exact_match(tmp_path):
    from dms_megatron.data.recall import score_recall, write_eval

    write_eval(tmp_path / "e.jsonl", [{"prompt_ids": [1, 2], "answer_ids": [3, 4]},
                                      {"prompt_ids": [1, 5], "answer_ids": [6, 7]}])
    assert score_recall(lambda prompts, n: [[3, 4], [6, 0]], tmp_path / "e.jsonl") == 0.5
    with pytest.raises(FileNotFoundError):
        score_recall(lambda p, n: [], tmp_path / "missing.jsonl")

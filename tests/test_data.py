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


def _expected_idx(lengths, dtype_code=8, itemsize=2):
    """Megatron's .idx layout written out by hand: header, version 1, dtype code (8 = uint16), sequence and document
    counts, int32 sequence lengths, int64 byte offsets, int64 document boundaries (one sequence per document)."""
    import struct

    offsets = [sum(lengths[:i]) * itemsize for i in range(len(lengths))]
    return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
            + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1)
            + struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(lengths)}q", *offsets)
            + struct.pack(f"<{len(lengths) + 1}q", *range(len(lengths) + 1)))


def test_preprocess_writes_megatron_lm_bytes_and_two_workers_write_the_same(tok, tmp_path):
    """The layout Megatron-LM's tools/preprocess_data.py writes (HuggingFaceTokenizer, --append-eod), byte for byte;
    --workers 2 tokenizes in two processes and writes the same bytes, in input order."""
    import struct

    from transformers import AutoTokenizer

    docs = [f"def f{i}(x):\n    return x * {i}  # {'ü' * (i % 7)}\n" * (1 + i % 5) for i in range(300)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ref = AutoTokenizer.from_pretrained(str(tok))
    ids = [ref(d, add_special_tokens=False)["input_ids"] + [ref.eos_token_id] for d in docs]
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "d"
        r = _cli("--input", src, "--tokenizer", tok, "--output-prefix", out, "--workers", workers, "--append-eod",
                 "--log-interval", 100)
        assert r.returncode == 0, r.stderr
        assert "processed 300 documents" in r.stdout and "left" in r.stdout
        flat = [t for doc in ids for t in doc]
        assert (tmp_path / f"w{workers}" / "d.bin").read_bytes() == struct.pack(f"<{len(flat)}H", *flat)
        assert (tmp_path / f"w{workers}" / "d.idx").read_bytes() == _expected_idx([len(d) for d in ids])


def _run_main(*args):
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data_cli", ROOT / "tools" / "preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in args])


def test_preprocess_chat_template_renders_messages_with_the_tokenizers_template(tok, tmp_path):
    import shutil

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    chat_tok = tmp_path / "chat-tok"
    shutil.copytree(tok, chat_tok)
    t = AutoTokenizer.from_pretrained(str(chat_tok))
    t.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    t.save_pretrained(str(chat_tok))
    chats = [[{"role": "user", "content": f"what is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}]
             for i in range(5)]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    assert _run_main("--input", src, "--chat-template", "--tokenizer", chat_tok, "--output-prefix",
                     tmp_path / "sft") == 0
    ds = IndexedDataset(str(tmp_path / "sft"))
    for i, c in enumerate(chats):  # the template rendered by hand, tokenized as plain text
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in c)
        assert ds[i].tolist() == t(text, add_special_tokens=False)["input_ids"] + [t.eos_token_id]
    assert _run_main("--input", src, "--chat-template", "--tokenizer", tok, "--output-prefix", tmp_path / "x") == 2


def test_preprocess_parquet_columns_one_dataset_per_key(tok, tmp_path):
    import pyarrow as pa  # the dev extra installs it: this test runs wherever the tests do
    import pyarrow.parquet as pq
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    rows = {"text": [f"body {i}" for i in range(7)], "title": [f"title {i}" for i in range(7)]}
    pq.write_table(pa.table(rows), tmp_path / "in.parquet")
    assert _run_main("--input", tmp_path / "in.parquet", "--json-keys", "text", "title", "--tokenizer", tok,
                     "--output-prefix", tmp_path / "p", "--no-append-eod") == 0
    ref = AutoTokenizer.from_pretrained(str(tok))
    for key in ("text", "title"):  # Megatron-LM's naming: PREFIX_<key>_document
        ds = IndexedDataset(str(tmp_path / f"p_{key}_document"))
        assert [ds[i].tolist() for i in range(len(ds))] == [ref(x, add_special_tokens=False)["input_ids"]
                                                           for x in rows[key]]


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
    from dms_megatron.config import DataBlend
    from dms_megatron.data.indexed import build_gpt_datasets, write_indexed

    eos, pad = 0, 1
    docs = [[5, 6, 7, eos], [8, 9, eos], [10, 11, 12, 13, eos]] * 20
    write_indexed(tmp_path / "t", docs, 32)
    write_indexed(tmp_path / "v", docs, 32)
    train, _ = build_gpt_datasets(DataBlend.per_split(tmp_path / "t", tmp_path / "v"), 8, 0, 10, 2, eos, pad, 32)
    for i in range(5):
        it = train[i]
        toks, labels, mask = it["tokens"].tolist(), it["labels"].tolist(), it["loss_mask"].tolist()
        assert labels[:-1] == toks[1:]  # next-token labels of one packed window
        for t, m in zip(toks, mask):  # predictions made from EOS are excluded, all others kept
            assert m == (0.0 if t == eos else 1.0)


def _two_datasets(tmp_path, eos=0):
    """Dataset A holds only token 5, dataset B only token 7 (plus EOS): a sample says where it was drawn from."""
    from dms_megatron.data.indexed import write_indexed

    write_indexed(tmp_path / "A", [[5] * 11 + [eos]] * 400, 32)
    write_indexed(tmp_path / "B", [[7] * 11 + [eos]] * 400, 32)
    return str(tmp_path / "A"), str(tmp_path / "B")


def _share_of_a(ds, n):
    from_a = 0
    for i in range(n):
        toks = set(ds[i]["tokens"].tolist()) - {0}
        assert toks in ({5}, {7})  # each sample comes from one dataset
        from_a += toks == {5}
    return from_a / n


@pytest.mark.parametrize("how", ["per_split", "split"])
def test_weighted_blend_samples_in_proportion_to_its_weights(tmp_path, how, megatron_single):
    from dms_megatron.config import DataConfig
    from dms_megatron.data.indexed import build_gpt_datasets

    a, b = _two_datasets(tmp_path)
    if how == "per_split":
        data = DataConfig(train_blend=[0.3, a, 0.7, b], valid_blend=f"1 {a} 3 {b}", tokenizer="t").data_blend()
    else:  # Megatron-LM's --data-path "0.3 A 0.7 B" --split 98,2,0
        data = DataConfig(blend=f"0.3 {a} 0.7 {b}", split=[98, 2, 0], tokenizer="t").data_blend()
    n = 400
    train, valid = build_gpt_datasets(data, 8, 0, n, 40, 0, 1, 32, cache_dir=str(tmp_path / "cache"))
    assert abs(_share_of_a(train, n) - 0.3) < 0.03
    if how == "per_split":
        assert abs(_share_of_a(valid, 40) - 0.25) < 0.05


def test_blend_of_prefixes_without_weights_samples_by_size(tmp_path, megatron_single):
    """Megatron-LM's unweighted list: each dataset in proportion to its size (A holds 3x B's tokens)."""
    from dms_megatron.config import DataConfig
    from dms_megatron.data.indexed import build_gpt_datasets, write_indexed

    write_indexed(tmp_path / "A", [[5] * 11 + [0]] * 300, 32)
    write_indexed(tmp_path / "B", [[7] * 11 + [0]] * 100, 32)
    data = DataConfig(train_blend=[str(tmp_path / "A"), str(tmp_path / "B")], valid_prefix=str(tmp_path / "B"),
                      tokenizer="t").data_blend()
    train, _ = build_gpt_datasets(data, 8, 0, 200, 4, 0, 1, 32, cache_dir=str(tmp_path / "cache"))
    assert abs(_share_of_a(train, 200) - 0.75) < 0.05


@pytest.mark.parametrize("kw,needle", [
    (dict(blend="0.3 A 0.7"), "has 3 entries"),
    (dict(blend=[0.3, "A", -0.7, "B"]), "weight -0.7 (of B) must be a positive number"),
    (dict(blend="0 A 1 B"), "weight '0' (of A) must be a positive number"),
    (dict(blend="A 0.5 B"), "'0.5' is a number among prefixes"),
    (dict(blend="1 A", split="100,0,0"), "needs a train and a valid part"),
    (dict(train_prefix="0.3 A 0.7 B", valid_prefix="V"), "a blend goes into data.train_blend"),
    (dict(train_blend="A"), "data.valid_blend (or data.valid_prefix) is missing"),
    (dict(blend="A", train_prefix="B"), "both given"),
    (dict(split="98,2,0", train_prefix="A", valid_prefix="B"), "data.split divides data.blend"),
])
def test_bad_blends_are_one_line_config_errors(kw, needle):
    from dms_megatron.config import ConfigError, DataConfig

    with pytest.raises(ConfigError) as e:
        DataConfig(tokenizer="t", **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _parse(task, toks):
    """Independent reading of an example: statements (key -> (value, position)) and questions (key, answer pos)."""
    stated, asked = {}, []
    for i in range(len(toks) - 2):
        if toks[i] == task.kv:
            stated[toks[i + 1]] = (toks[i + 2], i + 2)
        if toks[i] == task.q:
            asked.append((toks[i + 1], i + 2))
    return stated, asked


def test_mqar_examples_ask_every_stated_key_after_the_statements(tok):
    from dms_megatron.data.recall import TASKS, RecallTask, filler_from
    from dms_megatron.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    task = RecallTask(t, TASKS["mqar"])
    text = list(range(60, 300))  # plain-text stand-in: no task symbols
    for seed in range(20):
        toks, answers = task.example(random.Random(seed), filler_from(text)(random.Random(seed)))
        again = task.example(random.Random(seed), filler_from(text)(random.Random(seed)))
        assert (toks, answers) == again  # deterministic in the seed
        stated, asked = _parse(task, toks)
        lo, hi = TASKS["mqar"].pairs
        assert lo <= len(stated) <= hi and len(set(v for v, _ in stated.values())) == len(stated)  # distinct values
        assert sorted(k for k, _ in asked) == sorted(stated)  # every stated key asked exactly once
        assert [p for _, p in asked] == answers
        for key, p in asked:
            value, where = stated[key]
            assert toks[p] == value and where < p - 2  # the answer is the value stated for that key, earlier
            assert p - where > TASKS["mqar"].tail[0]  # and at least the tail filler away
        assert len(toks) <= TASKS["mqar"].longest() <= 256


def test_recall_items_are_one_length_and_end_with_their_last_answer(tok):
    from dms_megatron.data.recall import TASKS, RecallTask, filler_from
    from dms_megatron.data.tokenizer import load_tokenizer

    t = load_tokenizer(tok)
    rng = random.Random(0)
    filler = filler_from(list(range(60, 300)))(rng)
    for name in ("mqar", "single"):
        task = RecallTask(t, TASKS[name])
        for _ in range(10):
            it = task.item(rng, filler, 256)
            assert len(it["ids"]) == 256 and it["answers"][-1] == 255
            stated, asked = _parse(task, it["ids"])
            assert [p for _, p in asked] == it["answers"]
        if name == "single":
            assert list(stated) == [task.keys[0]]  # the fixed marker key


def test_recall_documents_keep_whole_examples_inside_the_window(tok):
    from dms_megatron.data.recall import TASKS, RecallTask, filler_from
    from dms_megatron.data.tokenizer import load_tokenizer

    task = RecallTask(load_tokenizer(tok), TASKS["mqar"])
    rng = random.Random(1)
    filler = filler_from(list(range(60, 300)))(rng)
    fronts = set()
    for _ in range(30):
        toks, answers = task.document(rng, filler, 257)
        stated, asked = _parse(task, toks)
        assert len(toks) == 257 and [p for _, p in asked] == answers and len(answers) == len(stated)
        fronts.add(toks.index(task.kv))
    assert len(fronts) > 10  # the example sits at varying offsets


def test_answer_accuracy_and_item_file_errors(tmp_path):
    from dms_megatron.data.recall import answer_accuracy, read_items, write_items

    items = [{"ids": [1, 2, 3, 4], "answers": [2, 3]}, {"ids": [5, 6, 7], "answers": [2]}]
    # predictions[i][p - 1] predicts ids[p]
    assert answer_accuracy(items, [[0, 3, 4, 0], [0, 0, 0]]) == pytest.approx(2 / 3)
    write_items(tmp_path / "e.jsonl", items)
    assert read_items(tmp_path / "e.jsonl") == items
    with pytest.raises(FileNotFoundError):
        read_items(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"ids": [1, 2], "answers": [5]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a recall item"):
        read_items(tmp_path / "bad.jsonl")


def test_corpus_split_is_by_file_and_disjoint():
    from dms_megatron.data.corpus import split_of, stdlib_files

    train, held = set(stdlib_files("train")), set(stdlib_files("heldout"))
    assert train and held and not train & held
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.1
    assert split_of("json/decoder.py") == split_of("json/decoder.py")  # a pure function of the relative path


@pytest.mark.parametrize("vocab", [300, 70_000])  # uint16 and int32 storage
def test_max_token_id_is_the_largest_stored_id(tmp_path, vocab):
    from dms_megatron.data.indexed import max_token_id, write_indexed

    rng = random.Random(vocab)
    docs = [[rng.randrange(vocab - 1) for _ in range(rng.randrange(1, 50))] for _ in range(40)]
    docs[17][3:3] = [vocab - 1]  # the largest id, inside a document in the middle
    write_indexed(tmp_path / "d", docs, vocab)
    assert max_token_id(tmp_path / "d") == vocab - 1 == max(max(d) for d in docs)
    write_indexed(tmp_path / "d", docs[:17], vocab)  # rewritten: the remembered answer does not outlive the file
    assert max_token_id(tmp_path / "d") == max(max(d) for d in docs[:17]) < vocab - 1


def test_chain_examples_state_every_hop_before_the_question(tok):
    """Every answer token is the target of the statement whose source is the token before it; the chain starts
    at the asked key, ends at a value, and the distractor chain shares no key with it."""
    from dms_megatron.data.recall import TASKS, ChainTask, filler_from
    from dms_megatron.data.tokenizer import load_tokenizer

    task = ChainTask(load_tokenizer(tok), TASKS["chain"])
    text = list(range(60, 300))
    lengths = set()
    for seed in range(30):
        rng = random.Random(seed)
        toks, answers = task.example(rng, filler_from(text)(rng))
        links = {toks[i + 1]: (toks[i + 2], i) for i in range(len(toks) - 2) if toks[i] == task.kv}
        q = toks.index(task.q)
        assert answers == list(range(q + 2, len(toks))) and len(toks) <= TASKS["chain"].longest() <= 256
        lo, hi = TASKS["chain"].hops
        assert lo <= len(answers) <= hi
        for a in answers:
            target, where = links[toks[a - 1]]  # the statement of the key just written
            assert target == toks[a] and where < q
        assert all(t in task.keys for t in toks[q + 1:-1]) and toks[-1] in task.values
        chain = set(toks[q + 1:])
        assert len(links) > len(answers) and sum(k in chain for k in links) == len(answers)  # a distractor too
        lengths.add(len(answers))
        it = task.item(random.Random(seed), filler_from(text)(random.Random(seed)), 240)
        assert len(it["ids"]) == 240 and it["answers"][0] == 240 - hi  # every prompt has one length
    assert lengths == set(range(lo, hi + 1))

"""The embedded default: the tiny teacher shipped inside the package and the data its re-fit runs on.

``dms_megatron/assets/tiny_teacher/`` (written by ``tools/build_tiny_teacher.py``, checked against
``assets/tiny_teacher.sha256`` before use) is a Hugging Face Llama model dir (config.json + model.safetensors + its
tokenizer) with ``build.json`` (recipe, measured recall, versions) and ``heldout/``: recall items per task
(``<task>.jsonl``, made from held-out text, never seen in pre-training or re-fitting) and held-out text sequences
for the KL (``text.json``).

``ensure_refit_data()`` builds (once, cached, atomically) the re-fit's megatron indexed datasets from the shipped
tokenizer and this interpreter's standard library: plain text and recall documents from the training split of the
corpus, validation documents from its held-out split.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from dms_megatron.data.corpus import stdlib_texts
from dms_megatron.data.indexed import write_indexed
from dms_megatron.data.recall import RecallTask, filler_from, make_task
from dms_megatron.data.tokenizer import load_tokenizer
from dms_megatron.progress import fmt_duration, rate_and_left, say, stop_raises

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
TEACHER = "tiny_teacher"
TEACHER_DIR = ASSETS_DIR / TEACHER
REBUILD = "python tools/build_tiny_teacher.py"
DATA_VERSION = "refit-data-v1"
TEXT_CHARS = 3_000_000
HELDOUT_CHARS = 600_000


class AssetError(RuntimeError):
    """The shipped teacher is missing or damaged (the message names the file and the tool that rebuilds it)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksums_of(teacher_dir: Path) -> Path:
    """The checksum file of a teacher dir: ``<dir>.sha256`` beside it (not inside: the dir is a HF model dir whose
    side files are copied along with converted weights)."""
    return teacher_dir.with_name(teacher_dir.name + ".sha256")


def write_checksums(teacher_dir: Path) -> Path:
    """``<dir>.sha256`` over every file below ``teacher_dir`` (sorted, `sha256sum -c` format, paths relative to
    the dir)."""
    files = sorted(p for p in teacher_dir.rglob("*") if p.is_file())
    sums = checksums_of(teacher_dir)
    sums.write_text("".join(f"{sha256(p)}  {p.relative_to(teacher_dir).as_posix()}\n" for p in files))
    return sums


def verify_teacher(teacher_dir: Path = TEACHER_DIR) -> Path:
    """``teacher_dir`` after checking every file against its checksums; one-line AssetError otherwise."""
    sums = checksums_of(teacher_dir)
    if not sums.is_file():
        raise AssetError(f"the embedded teacher is missing ({sums} does not exist); rebuild it with {REBUILD}")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        p = teacher_dir / name
        if not p.is_file():
            raise AssetError(f"the embedded teacher is incomplete: {p} is missing; rebuild it with {REBUILD}")
        if sha256(p) != digest:
            raise AssetError(f"the embedded teacher is damaged: {p} does not match its checksum in {sums}; "
                             f"rebuild it with {REBUILD} (or reinstall the package)")
    return teacher_dir


@dataclass
class RefitData:
    """Locations of the embedded default's re-fit inputs."""

    teacher: Path
    tokenizer: Path
    train_prefix: str
    valid_prefix: str
    recall_eval: Path


def heldout_file(teacher_dir: Path, name: str) -> Path:
    """``heldout/<task>.jsonl`` (recall items of a task) or ``heldout/text.json`` (name "text")."""
    return teacher_dir / "heldout" / ("text.json" if name == "text" else f"{name}.jsonl")


def cache_root(cache_dir: Optional[str] = None) -> Path:
    base = cache_dir or os.environ.get("DMS_CACHE_DIR") or os.path.join(Path.home(), ".cache", "dms-megatron")
    return Path(base)


@contextmanager
def file_lock(path: Path, what: str, log: Callable[[str], None]):
    """An exclusive lock on ``path``; says once that it waits, and for whom (the pid recorded by the holder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            log(f"waiting for {what}: process {f.read().strip() or '?'} holds {path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def text_ids(tok, split: str, chars: int) -> List[int]:
    """One token stream of the corpus split (documents joined by EOS)."""
    out: List[int] = []
    for t in stdlib_texts(chars, split=split):
        out += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def _documents(tok, stream: List[int], tasks: List[RecallTask], recall_docs: int, seq: int,
               seed: int) -> List[List[int]]:
    """Plain text chunks of ``seq`` tokens plus ``recall_docs`` recall documents of exactly ``seq`` tokens (so
    megatron's packed samples start at document boundaries and no example is cut), split evenly over ``tasks``,
    shuffled."""
    rng = random.Random(seed)
    filler = filler_from(stream)(rng)
    docs = [stream[i:i + seq] for i in range(0, len(stream) - seq, seq)]
    docs += [tasks[j % len(tasks)].document(rng, filler, seq)[0] for j in range(recall_docs)]
    rng.shuffle(docs)
    return docs


def refit_tasks(tok, recall: str, teacher: Path) -> List[RecallTask]:
    """The recall tasks of the re-fit data: the chosen one, and chained recall when the teacher was pre-trained on
    it (it ships held-out chained-recall items): a student re-fitted without chains would lose what dms-hyperscale
    measures."""
    names = [recall] + (["chain"] if heldout_file(teacher, "chain").is_file() else [])
    return [make_task(tok, name) for name in dict.fromkeys(names)]


def ensure_refit_data(recall: str = "mqar", seq_length: int = 256, cache_dir: Optional[str] = None,
                      log: Callable[[str], None] = say, teacher: Optional[Path] = None) -> RefitData:
    """The embedded default's re-fit inputs, building the indexed datasets once (a few seconds) into the cache.
    ``teacher``: the embedded teacher dir as ``verify_teacher()`` returned it to the caller (else verified here)."""
    teacher = verify_teacher() if teacher is None else teacher
    root = cache_root(cache_dir) / f"{DATA_VERSION}-{recall}-{seq_length}-{sha256(checksums_of(teacher))[:12]}"
    data = RefitData(teacher, teacher, str(root / "train"), str(root / "valid"), heldout_file(teacher, recall))
    if (root / "done").is_file():
        return data
    with file_lock(root.with_name(root.name + ".lock"), "the re-fit data build", log), stop_raises():
        if (root / "done").is_file():
            return data
        for stale in root.parent.glob(root.name + ".tmp-*"):  # left by a build that was killed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        t0, tmp = time.time(), root.with_name(root.name + f".tmp-{os.getpid()}")
        tmp.mkdir(parents=True)
        try:
            _build_refit_data(tmp, teacher, recall, seq_length, log)
            (tmp / "done").write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"re-fit data built in {root} ({time.time() - t0:.0f} s)")
    return data


#: the two splits of the re-fit data: name, corpus split, text characters, recall documents, seed
SPLITS = (("train", "train", TEXT_CHARS, 12_000, 1), ("valid", "heldout", HELDOUT_CHARS, 400, 2))


def _build_refit_data(out: Path, teacher: Path, recall: str, seq_length: int, log: Callable[[str], None]) -> None:
    """Both splits into ``out``, a progress line (rate, time left) after each; the work is about proportional to
    the characters tokenised."""
    tok = load_tokenizer(teacher)
    tasks = refit_tasks(tok, recall, teacher)
    total, done, t0 = sum(s[2] for s in SPLITS), 0, time.time()
    log(f"building the re-fit data once into {out.parent}: {total / 1e6:.1f}M characters of stdlib text + recall "
        f"documents (seconds)")
    for name, split, chars, n, seed in SPLITS:
        docs = _documents(tok, text_ids(tok, split, chars), tasks, n, seq_length, seed)
        write_indexed(out / name, docs, len(tok))
        done += chars
        rate, left = rate_and_left(done, total, time.time() - t0)
        log(f"re-fit data: {name} split ({len(docs):,} documents) ready, {done / total:.0%} at "
            f"{rate / 1e3:.0f}k characters/s, {fmt_duration(left)} left")


def read_heldout_text(path: Path, count: int, length: int) -> List[List[int]]:
    """The first ``count`` shipped held-out text sequences, cut to ``length`` tokens."""
    seqs: Dict[str, list] = json.loads(Path(path).read_text())
    out = [s[:length] for s in seqs["sequences"] if len(s) >= length][:count]
    if len(out) < count:
        raise ValueError(f"{path} has {len(out)} held-out sequences of >= {length} tokens, {count} were asked for")
    return out


__all__ = ["ASSETS_DIR", "TEACHER_DIR", "AssetError", "verify_teacher", "write_checksums", "checksums_of",
           "ensure_refit_data", "refit_tasks", "RefitData", "heldout_file", "cache_root", "file_lock", "text_ids",
           "read_heldout_text", "sha256"]

"""A small byte-level BPE tokenizer trained offline, saved as a transformers ``PreTrainedTokenizerFast`` dir."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List

from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS = "<|eos|>"
PAD = "<|pad|>"
KV, QUERY = "<|kv|>", "<|q|>"
NUM_KEYS, NUM_VALUES = 16, 32


def recall_special_tokens() -> List[str]:
    """Task tokens: markers, key symbols <|k0|>.. and value symbols <|v0|>.. (never produced from plain text)."""
    return ([KV, QUERY] + [f"<|k{i}|>" for i in range(NUM_KEYS)]
            + [f"<|v{i}|>" for i in range(NUM_VALUES)])


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on ``texts`` and save it (tokenizer.json + HF config) into ``out_dir``."""
    bpe = ByteLevelBPETokenizer()
    specials = [EOS, PAD] + recall_special_tokens()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD,
                                  additional_special_tokens=recall_special_tokens())
    tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(path: str | Path):
    """Load a Hugging Face tokenizer directory; one-line error if it is missing or has no EOS token."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {p} does not exist")
    tok = AutoTokenizer.from_pretrained(str(p))
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {p} has no EOS token; set eos_token in its tokenizer_config.json")
    return tok


class MegatronTokenizerAdapter:
    """The few attributes megatron-core's GPTDataset reads from a tokenizer (eod, pad, vocab_size)."""

    def __init__(self, eod: int, pad: int, vocab_size: int):
        self.eod = eod
        self.pad = pad
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": "MegatronTokenizerAdapter", "eod": eod, "pad": pad,
                                   "vocab_size": vocab_size}

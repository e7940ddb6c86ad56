"""What a re-fit reads, resolved and checked before any model is built: the teacher's weights (megatron checkpoint or
Hugging Face dir) and architecture, tokenizer, data prefixes, held-out recall items.

``RunInputs.resolve(cfg, build=False)`` only checks (what the pre-flight, ``training.preflight``, runs before a run
dir exists: nothing is built or written); ``build=True``, or ``built()`` on a check-only result, also builds the
embedded default's data once.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dms_megatron.checkpoint import CheckpointError
from dms_megatron.checkpoint.megatron_lm import checkpoint_configs, megatron_lm_args
from dms_megatron.config import (REQUIRED, UNSET, ConfigError, DataBlend, ModelConfig, RefitConfig, check_positions,
                                 check_same_arch)
from dms_megatron.convert.hf_io import ConversionError
from dms_megatron.convert.hf_model import is_hf_dir, read_hf_model
from dms_megatron.data.embedded import AssetError, ensure_refit_data, heldout_file, verify_teacher
from dms_megatron.data.indexed import build_gpt_datasets, check_prefix, max_token_id
from dms_megatron.data.recall import read_items
from dms_megatron.data.tokenizer import load_tokenizer
from dms_megatron.progress import say


@dataclass(frozen=True)
class RunInputs:
    model_config: ModelConfig
    init: Path  # megatron checkpoint dir or HF dir of the teacher (and the student's initial weights)
    tokenizer: Path
    data: Optional[DataBlend]  # None only in a check-only resolve of the embedded default
    recall_eval: Optional[Path]
    eos_id: int
    pad_id: int

    def datasets(self, cfg: RefitConfig, run_dir):
        """(train, valid) megatron GPT datasets of a run: the same samples on every rank and in its report."""
        t = cfg.train
        return build_gpt_datasets(self.data, t.seq_length, t.seed,
                                  t.steps * t.global_batch_size, max(1, t.eval_batches * t.micro_batch_size),
                                  self.eos_id, self.pad_id, self.model_config.vocab_size,
                                  cache_dir=None if cfg.embedded else str(Path(run_dir) / "data-cache"))

    @classmethod
    def resolve(cls, cfg: RefitConfig, build: bool = True, log=say) -> "RunInputs":
        """One-line ConfigError for anything missing or inconsistent."""
        with _as_config_error():
            return cls._resolve(cfg, build, log)

    def built(self, cfg: RefitConfig, log=say) -> "RunInputs":
        """These inputs with the embedded default's data built (once, cached); itself when they hold data."""
        if self.data is not None:
            return self
        with _as_config_error():
            # self.init is the embedded teacher, verified when these inputs were resolved
            d = ensure_refit_data(cfg.data.recall, cfg.train.seq_length, log=log, teacher=self.init)
            data = DataBlend.per_split(d.train_prefix, d.valid_prefix)
            _check_token_ids(data, self.model_config)
            return dataclasses.replace(self, data=data)

    @classmethod
    def _resolve(cls, cfg: RefitConfig, build: bool, log) -> "RunInputs":
        if cfg.embedded:
            init = tok_dir = verify_teacher()
            data = None
            recall = heldout_file(init, cfg.data.recall)
        else:
            init, tok_dir = Path(cfg.train.init_checkpoint), Path(cfg.data.tokenizer)
            data = cfg.data.data_blend()
            for prefix in data.prefixes():
                check_prefix(prefix, _field_of(cfg, prefix))
            recall = Path(cfg.data.recall_eval) if cfg.data.recall_eval else None
        mc = init_model_config(init, cfg.model)
        mc = dataclasses.replace(mc, spec=cfg.model.spec)  # how to build it is the run's choice, not the teacher's
        check_positions(cfg.train.seq_length, mc.max_position_embeddings, "the teacher's max_position_embeddings",
                        f" ({init})")
        tok = load_tokenizer(tok_dir)
        if len(tok) > mc.vocab_size:
            raise ConfigError(f"tokenizer {tok_dir} has {len(tok)} tokens but the model vocabulary is "
                              f"{mc.vocab_size}: wrong tokenizer for this model")
        if data is not None:
            _check_token_ids(data, mc)
        if recall is not None:
            read_items(recall)  # exists and parses
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        inputs = cls(mc, init, tok_dir, data, recall, tok.eos_token_id, pad)
        return inputs.built(cfg, log) if build else inputs

    def to_dict(self) -> dict:
        """A JSON-able record (``from_dict`` reads it back)."""
        d = dataclasses.asdict(self)
        return dict(d, init=str(self.init), tokenizer=str(self.tokenizer),
                    recall_eval=None if self.recall_eval is None else str(self.recall_eval))

    @classmethod
    def from_dict(cls, d: dict) -> "RunInputs":
        data = d["data"]
        if data is not None:  # JSON keeps a blend's (prefixes, weights) pair as a list
            data = DataBlend(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        return cls(ModelConfig(**d["model_config"]), Path(d["init"]), Path(d["tokenizer"]), data,
                   None if d["recall_eval"] is None else Path(d["recall_eval"]), d["eos_id"], d["pad_id"])


@contextmanager
def _as_config_error():
    """Any input failure below as one ConfigError line."""
    try:
        yield
    except (AssetError, CheckpointError, ConversionError, FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def _check_token_ids(data: DataBlend, mc: ModelConfig) -> None:
    for prefix in data.prefixes():
        m = max_token_id(prefix)
        if m >= mc.vocab_size:
            raise ConfigError(f"{prefix}.bin holds token id {m} >= model vocab {mc.vocab_size}: data was "
                              f"tokenized with another tokenizer")


def _field_of(cfg: RefitConfig, prefix: str) -> str:
    """The data.* field that names ``prefix`` (for its error line)."""
    d = cfg.data
    for name in ("train_prefix", "valid_prefix", "blend", "train_blend", "valid_blend"):
        v = getattr(d, name)
        if v is not None and prefix in (v.split() if isinstance(v, str) else [str(x) for x in v]):
            return f"data.{name}"
    return "data prefix"


def refit_config(d: dict) -> RefitConfig:
    """The RefitConfig of a composed config (``complete_model`` first): what the launchers build."""
    return RefitConfig.from_dict(complete_model(d))


def complete_model(d: dict) -> dict:
    """``d`` (a composed re-fit config) with the architecture fields its model section leaves unset (``???`` or
    absent) read from ``train.init_checkpoint``: a HF dir's config.json (by its family), this project's checkpoint's
    recorded model_config or a Megatron-LM checkpoint's args. The fields it sets stay, and ``RunInputs.resolve``
    compares them with the checkpoint (one line naming each that differs). Without a checkpoint ``d`` is returned
    as it is (``RefitConfig.from_dict`` names the unset fields)."""
    model = dict(d.get("model") or {})
    unset = [f for f in REQUIRED if model.get(f, UNSET) == UNSET]
    init = (d.get("train") or {}).get("init_checkpoint")
    if not unset or not init:
        return d
    try:
        if not Path(init).exists():
            raise ConfigError(f"train.init_checkpoint {init} does not exist")
        mc = read_hf_model(init)[1] if is_hf_dir(init) else checkpoint_configs(init)[0]
        args = None if is_hf_dir(init) else megatron_lm_args(init)
    except (CheckpointError, ConversionError, FileNotFoundError, ValueError) as e:
        raise (e if isinstance(e, ConfigError) else ConfigError(f"train.init_checkpoint {init}: {e}")) from None
    if "vocab_size" in unset and args is not None and not getattr(args, "vocab_size", None):
        raise ConfigError(f"model.vocab_size is unset and the Megatron-LM checkpoint {init} does not record it (its "
                          f"args hold only the padded size {args.padded_vocab_size}): give model.vocab_size=N, the "
                          f"tokenizer's vocabulary")
    model.update({f: getattr(mc, f) for f in unset})
    return {**d, "model": model}


def init_model_config(init: Path, like: ModelConfig) -> ModelConfig:
    """The architecture recorded with a teacher (a HF dir's config.json, this project's checkpoint's extra state, or
    a Megatron-LM checkpoint's args), checked against the run's model config ``like``."""
    if not Path(init).exists():
        raise ConfigError(f"train.init_checkpoint {init} does not exist")
    if is_hf_dir(init):
        mc = read_hf_model(init)[1]
    else:
        mc, _, extra = checkpoint_configs(init, like=like)
        if extra.get("megatron_lm"):
            return mc  # compared field by field, padded vocabulary included
    check_same_arch(like, mc, f"the teacher {init}")
    return mc


__all__ = ["RunInputs", "init_model_config", "complete_model", "refit_config"]

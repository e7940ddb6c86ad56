"""Run-level configuration of a re-fit: optimisation, data, layout, logging, resume policy and their composition.

These dataclasses are the only place defaults live; Hydra's ConfigStore holds them as the schema and the YAML
groups under ``configs/`` only override.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

from dms_megatron.config.base import ConfigError, check_choice, check_ints, fail, from_dict, is_int
from dms_megatron.config.blend import DEFAULT_SPLIT, DataBlend, parse_blend, parse_split
from dms_megatron.config.dms import DMSConfig
from dms_megatron.config.model import ModelConfig

TRAIN_MODES = ("full", "adapter")
KD_DIRECTIONS = ("student_teacher", "teacher_student")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
#: how a distributed optimizer's state is written (megatron-core's ``distrib_optim_sharding_type``)
DIST_OPTIM_SHARDINGS = ("fully_reshardable", "dp_reshardable")


def resolved_precision(precision: str, cuda: bool) -> str:
    """``train.precision`` on a device ("bf16" or "fp32"): "auto" is bf16 on CUDA and fp32 on CPU (this rule's one
    place)."""
    check_choice("train", "precision", precision, PRECISIONS)
    return ("bf16" if cuda else "fp32") if precision == "auto" else precision
RECALL_TASKS = ("mqar", "single", "chain")


@dataclass
class TrainConfig:
    """Optimisation settings. global_batch_size = micro_batch_size * data-parallel size * accumulation steps.

    precision: "bf16" = bf16 parameters and compute with fp32 main parameters and gradients in the optimizer
    (megatron-core mixed precision), "fp32" everywhere, "auto" = bf16 on CUDA and fp32 on CPU.
    distributed_optimizer: shard the optimizer state over data-parallel ranks (megatron's distributed optimizer).
    dist_optim_sharding: how a distributed optimizer's state is checkpointed (megatron-core's
        ``distrib_optim_sharding_type``, recorded in the checkpoint, whose loads follow it): "fully_reshardable" (per
        parameter, like a plain optimizer's: loads at any tp x pp x dp; each save first gathers a data-parallel group's
        state into the host memory of each of its ranks, Megatron-LM's ``--dist-ckpt-optim-fully-reshardable``) or
        "dp_reshardable" (the data-parallel shards as they are, Megatron-LM's default: no gather, but it loads only
        at the tp x pp it was saved at, any dp).
    async_save: write checkpoints in the background (megatron-core's async dist-checkpointing); a save becomes
        ``latest`` when finalized at a later step boundary, before the next save or at exit.
    """

    mode: str = "full"
    steps: int = 600
    micro_batch_size: int = 8
    global_batch_size: int = 8
    seq_length: int = 256
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 10
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    kd_direction: str = "student_teacher"
    compression_weight: float = 1.0
    precision: str = "auto"
    distributed_optimizer: bool = False
    dist_optim_sharding: str = "fully_reshardable"
    async_save: bool = False
    seed: int = 1234
    save_interval: int = 100
    # held-out evaluation (KD and CR under inference eviction, logged to metrics.jsonl) every eval_interval steps
    # over eval_batches micro batches (0 = only the end-of-run report, which uses the same eval_batches)
    eval_interval: int = 100
    eval_batches: int = 8
    recall_eval_limit: int = 200
    # Initial weights of teacher and student: a megatron checkpoint dir (dms-convert import, a previous run) or a
    # Hugging Face model dir (config.json + safetensors); null = the embedded tiny teacher.
    init_checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        s = "train"
        check_choice(s, "mode", self.mode, TRAIN_MODES)
        check_choice(s, "kd_direction", self.kd_direction, KD_DIRECTIONS)
        check_choice(s, "lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        check_choice(s, "precision", self.precision, PRECISIONS)
        check_choice(s, "dist_optim_sharding", self.dist_optim_sharding, DIST_OPTIM_SHARDINGS)
        check_ints(s, self, ("steps", "micro_batch_size", "global_batch_size", "seq_length", "save_interval",
                             "eval_batches"))
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr={self.lr} / train.min_lr={self.min_lr}: need lr > 0 and 0 <= min_lr <= lr")
        check_ints(s, self, ("eval_interval",), lo=0)
        for name in ("warmup_steps", "clip_grad", "compression_weight", "weight_decay"):
            if not getattr(self, name) >= 0:
                fail(s, name, getattr(self, name), "must be >= 0")


@dataclass
class DataConfig:
    """Data locations; all null = the embedded tiny default's data. ``recall`` picks the embedded recall task:
    "mqar" (several key -> value pairs among filler text, then questions) or "single" (one stated value).

    Either one weighted ``blend`` (Megatron-LM's ``--data-path``: ``[0.3, A, 0.7, B]`` or ``"0.3 A 0.7 B"``)
    divided into train / valid by ``split`` (``--split``, default 969,30,1), or a blend per split: ``train_blend``
    / ``valid_blend`` (``--train-data-path`` / ``--valid-data-path``), for which ``train_prefix`` / ``valid_prefix``
    are the one-dataset shorthand.
    """

    train_prefix: Optional[str] = None
    valid_prefix: Optional[str] = None
    tokenizer: Optional[str] = None
    recall_eval: Optional[str] = None
    recall: str = "mqar"
    blend: Optional[Any] = None
    split: Optional[Any] = None
    train_blend: Optional[Any] = None
    valid_blend: Optional[Any] = None

    def __post_init__(self) -> None:
        check_choice("data", "recall", self.recall, RECALL_TASKS)
        for name in ("train_prefix", "valid_prefix"):
            v = getattr(self, name)
            if v is not None and len(str(v).split()) > 1:
                raise ConfigError(f"data.{name}={v!r} names more than one dataset: a blend goes into "
                                  f"data.{name.split('_')[0]}_blend (or data.blend with data.split)")
            if v is not None and getattr(self, name.replace("prefix", "blend")) is not None:
                raise ConfigError(f"data.{name} and data.{name.replace('prefix', 'blend')} both given: "
                                  f"data.{name} is the one-dataset shorthand of the blend; keep one")
        per_split = [getattr(self, n) is not None for n in ("train_prefix", "valid_prefix", "train_blend",
                                                              "valid_blend")]
        if self.blend is not None and any(per_split):
            raise ConfigError("data.blend (divided by data.split) and per-split data (data.train_blend / "
                              "data.valid_blend / data.train_prefix / data.valid_prefix) both given; keep one")
        if self.split is not None and self.blend is None:
            raise ConfigError("data.split divides data.blend, which is not given (per-split data needs no split)")
        self.data_blend()  # parses: a malformed blend fails here, before anything starts
        given = self.blend is not None or any(per_split)
        if given != (self.tokenizer is not None):
            raise ConfigError("data.tokenizer and the data (data.blend, or data.train_blend / data.valid_blend, or "
                              "data.train_prefix / data.valid_prefix) must be given together (or all left null "
                              "for the embedded default)")

    @property
    def given(self) -> bool:
        """Whether any data (not the embedded default's) is configured."""
        return self.data_blend() is not None

    def data_blend(self) -> Optional[DataBlend]:
        """The configured data as megatron-core takes it (None: the embedded default's); ConfigError if only one
        split has data."""
        if self.blend is not None:
            return DataBlend(blend=parse_blend("data.blend", self.blend),
                             split=parse_split("data.split", DEFAULT_SPLIT if self.split is None else self.split))
        train = self.train_blend if self.train_blend is not None else self.train_prefix
        valid = self.valid_blend if self.valid_blend is not None else self.valid_prefix
        if train is None and valid is None:
            return None
        if train is None or valid is None:
            missing = "data.train_blend (or data.train_prefix)" if train is None else \
                "data.valid_blend (or data.valid_prefix)"
            raise ConfigError(f"{missing} is missing: per-split data needs a train and a valid blend (or one "
                              f"data.blend divided by data.split)")
        return DataBlend(train=parse_blend("data.train_blend" if self.train_blend is not None else
                                           "data.train_prefix", train),
                         valid=parse_blend("data.valid_blend" if self.valid_blend is not None else
                                           "data.valid_prefix", valid))


@dataclass
class ParallelConfig:
    """Layout: world size = nnodes * nproc_per_node (default tp * pp ranks on one node); dp = world / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    nproc_per_node: Optional[int] = None
    nnodes: int = 1

    def __post_init__(self) -> None:
        check_ints("parallel", self, ("tp", "pp", "nnodes"))
        if self.nproc_per_node is not None and not is_int(self.nproc_per_node, 1):
            fail("parallel", "nproc_per_node", self.nproc_per_node, "must be null or an integer >= 1")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(f"world size {self.world_size} (parallel.nnodes * parallel.nproc_per_node) is not a "
                              f"multiple of parallel.tp * parallel.pp = {self.tp * self.pp}")

    @property
    def ranks_per_node(self) -> int:
        return self.nproc_per_node or self.tp * self.pp

    @property
    def world_size(self) -> int:
        return self.nnodes * self.ranks_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


@dataclass
class LoggingConfig:
    """Per-step metrics go to metrics.jsonl always; wandb (offline by default); a progress bar on a terminal, plain
    lines every ``log_interval`` steps otherwise (nohup, SLURM, submitit)."""

    wandb: bool = True
    wandb_project: str = "dms-megatron"
    wandb_mode: str = "offline"
    log_interval: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("logging", "wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        check_ints("logging", self, ("log_interval",))


@dataclass
class ResumeConfig:
    """Resuming a run dir: its config.yaml is the run's identity. ``allow_changes`` lists the keys (e.g.
    ``train.steps``) that may differ from it; any other difference is refused."""

    allow_changes: List[str] = field(default_factory=list)


def check_positions(seq_length: int, max_positions: int, of: str, tail: str) -> None:
    """The rule on positions: ``train.seq_length`` within ``of`` = ``max_positions`` (the configured model's, or the
    teacher's in the pre-flight); one-line ConfigError ending in ``tail`` otherwise."""
    if seq_length > max_positions:
        raise ConfigError(f"train.seq_length={seq_length} exceeds {of}={max_positions}{tail}")


def check_batch_split(t: TrainConfig, dp: int) -> None:
    """The rule on the global batch: whole micro batches on each of ``dp`` data-parallel ranks (the configured
    layout's, or a batch job's actual one in the pre-flight)."""
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                          f"train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}; e.g. "
                          f"train.micro_batch_size={max(1, t.global_batch_size // dp)}")


@dataclass
class RefitConfig:
    """Everything a re-fitting worker needs (``embedded=true``: the shipped tiny teacher and its data). ``model`` has
    no default (its preset gives it: ``TINY_TEACHER`` is the embedded one's)."""

    model: ModelConfig
    dms: DMSConfig = field(default_factory=DMSConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    embedded: bool = True

    def __post_init__(self) -> None:
        t, p = self.train, self.parallel
        if self.dms.window >= t.seq_length:
            raise ConfigError(f"dms.window={self.dms.window} must be < train.seq_length={t.seq_length} "
                              f"(otherwise nothing can ever be evicted)")
        check_positions(t.seq_length, self.model.max_position_embeddings, "model.max_position_embeddings",
                        ": the model was not trained on such positions")
        check_batch_split(t, p.dp)
        if p.sequence_parallel and t.seq_length % p.tp:
            raise ConfigError(f"parallel.sequence_parallel=true needs parallel.tp={p.tp} to divide "
                              f"train.seq_length={t.seq_length}")
        if self.embedded and (self.data.given or t.init_checkpoint):
            raise ConfigError("embedded=true uses the built-in data and teacher; set embedded=false to pass "
                              "data.* / train.init_checkpoint")
        if not self.embedded and t.init_checkpoint is None:
            raise ConfigError("train.init_checkpoint is required when embedded=false (a checkpoint written by "
                              "dms-convert import, a previous run, or a Hugging Face model dir)")
        if not self.embedded and not self.data.given:
            raise ConfigError("data (data.blend, or data.train_prefix / data.valid_prefix) and data.tokenizer are "
                              "required when embedded=false")
        if t.mode == "adapter" and self.dms.alpha_source != "adapter":
            raise ConfigError("train.mode=adapter trains only the DMS adapter: set dms.alpha_source=adapter")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, section: Optional[str] = None) -> "RefitConfig":
        """``section``: where the dict sits in a larger config (``refit`` of dms-eval), for the error lines."""
        return from_dict(cls, d, section)


__all__ = ["TrainConfig", "DataConfig", "ParallelConfig", "LoggingConfig", "ResumeConfig", "RefitConfig",
           "TRAIN_MODES", "KD_DIRECTIONS", "PRECISIONS", "RECALL_TASKS", "check_positions", "check_batch_split"]

"""Run-level configuration of a re-fit (plain validated dataclasses; the launcher registers them with Hydra)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from dms_megatron.config import ConfigError, DMSConfig, ModelConfig, _fail, from_dict

TRAIN_MODES = ("full", "adapter")
KD_DIRECTIONS = ("student_teacher", "teacher_student")


@dataclass
class TrainConfig:
    """Optimisation settings. global_batch_size = micro_batch_size * data-parallel size * accumulation steps."""

    mode: str = "full"
    steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 8
    seq_length: int = 256
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 10
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    kd_direction: str = "student_teacher"
    compression_weight: float = 1.0
    seed: int = 1234
    save_interval: int = 100
    eval_batches: int = 8
    recall_eval_limit: int = 200
    # Initial weights for teacher and student: a checkpoint directory (dms-convert import output or a previous
    # run); null = the embedded tiny teacher.
    init_checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        s = "train"
        if self.mode not in TRAIN_MODES:
            _fail(s, "mode", self.mode, f"allowed values: {', '.join(TRAIN_MODES)}")
        if self.kd_direction not in KD_DIRECTIONS:
            _fail(s, "kd_direction", self.kd_direction, f"allowed values: {', '.join(KD_DIRECTIONS)}")
        for name in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "save_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                _fail(s, name, v, "must be an integer >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr={self.lr} / train.min_lr={self.min_lr}: need lr > 0 and 0 <= min_lr <= lr")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            _fail(s, "lr_decay_style", self.lr_decay_style, "allowed values: cosine, linear, constant")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.compression_weight < 0:
            raise ConfigError("train.warmup_steps, train.clip_grad and train.compression_weight must be >= 0")


@dataclass
class DataConfig:
    """Data locations; all null = the embedded tiny default's data."""

    train_prefix: Optional[str] = None
    valid_prefix: Optional[str] = None
    tokenizer: Optional[str] = None
    recall_eval: Optional[str] = None

    def __post_init__(self) -> None:
        given = [self.train_prefix is not None, self.valid_prefix is not None, self.tokenizer is not None]
        if any(given) and not all(given):
            raise ConfigError("data.train_prefix, data.valid_prefix and data.tokenizer must be given together "
                              "(or all left null for the embedded default)")


@dataclass
class ParallelConfig:
    """Layout: world size = nnodes * nproc_per_node (default tp * pp ranks on one node); dp = world / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    nproc_per_node: Optional[int] = None
    nnodes: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "nnodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                _fail("parallel", name, v, "must be an integer >= 1")
        if self.nproc_per_node is not None and (not isinstance(self.nproc_per_node, int) or self.nproc_per_node < 1):
            _fail("parallel", "nproc_per_node", self.nproc_per_node, "must be null or an integer >= 1")

    @property
    def world_size(self) -> int:
        return self.nnodes * (self.nproc_per_node or self.tp * self.pp)
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "dms-megatron"
    wandb_mode: str = "offline"
    log_interval: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            _fail("logging", "wandb_mode", self.wandb_mode, "allowed values: offline, online, disabled")


@dataclass
class RefitConfig:
    """Everything a re-fitting worker needs. ``model.preset == "tiny"`` uses the embedded teacher's architecture."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dms: DMSConfig = field(default_factory=DMSConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    embedded: bool = True

    def __post_init__(self) -> None:
        if self.dms.window >= self.train.seq_length:
            raise ConfigError(f"dms.window={self.dms.window} must be < train.seq_length={self.train.seq_length} "
                              f"(otherwise nothing can ever be evicted)")
        if self.embedded and (self.data.train_prefix or self.train.init_checkpoint):
            raise ConfigError("embedded=true uses the built-in data and teacher; set embedded=false to pass "
                              "data.* / train.init_checkpoint")
        if not self.embedded and self.train.init_checkpoint is None:
            raise ConfigError("train.init_checkpoint is required when embedded=false (a checkpoint written by "
                              "dms-convert import or by a previous run)")
        if not self.embedded and self.data.train_prefix is None:
            raise ConfigError("data.train_prefix / data.valid_prefix / data.tokenizer are required when "
                              "embedded=false")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RefitConfig":
        d = dict(d)
        known = {"model", "dms", "train", "data", "parallel", "logging", "embedded"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown top-level config key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        model = dict(d.get("model") or {})
        model.pop("preset", None)
        return cls(
            model=from_dict(ModelConfig, model),
            dms=from_dict(DMSConfig, d.get("dms")),
            train=from_dict(TrainConfig, d.get("train")),
            data=from_dict(DataConfig, d.get("data")),
            parallel=from_dict(ParallelConfig, d.get("parallel")),
            logging=from_dict(LoggingConfig, d.get("logging")),
            embedded=d.get("embedded", True),
        )

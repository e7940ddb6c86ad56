"""Configuration of ``dms-eval`` (a validated dataclass; the launcher registers it with Hydra)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from dms_megatron.config import ConfigError, PressConfig, RefitConfig, check_ints, fail, from_dict
from dms_megatron.config.base import is_int
from dms_megatron.eval.budget import Hardware
from dms_megatron.inference.press import PRESSES


@dataclass
class EvalConfig:
    """What to evaluate. Students not listed in ``students`` are re-fitted first from ``refit`` with
    ``dms.final_cr`` set to each CR (the embedded default when ``refit.embedded`` is true); the teacher, held-out
    data and recall questions are those of ``refit`` unless given here. ``refit`` has no default (its model preset
    gives the model: ``refit.model`` has none)."""

    refit: RefitConfig
    crs: List[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    methods: List[str] = field(default_factory=lambda: list(PRESSES))
    # CR (as written in crs, e.g. "4") -> a dms-refit run dir or its checkpoints/ dir
    students: Dict[str, str] = field(default_factory=dict)
    # re-fitted students are kept under the cache dir, keyed by their full config, and reused by later runs
    reuse_students: bool = True
    teacher: Optional[str] = None        # megatron checkpoint or HF dir; null = the refit's init / embedded teacher
    recall_eval: Optional[str] = None    # JSONL of held-out recall items; null = the refit's
    valid_prefix: Optional[str] = None   # indexed held-out text; null = the refit's (embedded: the shipped text)
    recall_limit: Optional[int] = None   # first N items (null = all)
    kl_sequences: int = 8
    kl_length: Optional[int] = None      # null = refit.train.seq_length
    kl_bucket: int = 32                  # positions per entry of each row's kl_by_position
    press: PressConfig = field(default_factory=PressConfig)  # the baselines' settings (sinks, Quest's page)

    def __post_init__(self) -> None:
        if not self.crs:
            fail("eval", "crs", self.crs, "give at least one compression ratio, e.g. crs=[2,4,8]")
        for c in self.crs:
            if not isinstance(c, (int, float)) or c <= 1:
                fail("eval", "crs", self.crs, "every CR must be a number > 1 (CR 1 is the vanilla cache)")
        unknown = [m for m in self.methods if m not in PRESSES]
        if unknown or not self.methods:
            fail("eval", "methods", self.methods, f"allowed values: {', '.join(PRESSES)}")
        keys = {cr_key(c) for c in self.crs}
        extra = sorted(set(self.students) - keys)
        if extra:
            raise ConfigError(f"eval.students has CR(s) {extra} that are not in eval.crs={self.crs}")
        check_ints("eval", self, ("kl_sequences", "kl_bucket"))
        if self.kl_length is not None and not 2 <= self.kl_length <= self.refit.train.seq_length:
            fail("eval", "kl_length", self.kl_length, f"must lie in [2, refit.train.seq_length="
                                                        f"{self.refit.train.seq_length}]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, section: Optional[str] = None) -> "EvalConfig":
        """``section``: where the dict sits in a larger config (``eval`` of dms-hyperscale), for the error lines."""
        d = dict(d)
        d["refit"] = RefitConfig.from_dict(d.get("refit") or {}, f"{section}.refit" if section else "refit")
        d["students"] = {cr_key(float(k)): str(v) for k, v in (d.get("students") or {}).items()}
        return from_dict(cls, d, "eval")


@dataclass
class HyperscaleConfig:
    """What ``dms-hyperscale`` measures: chained-recall questions answered by W sampled chains of at most L tokens
    each, for every method of ``eval.methods`` (DMS students at ``eval.crs``, baselines at their budgets), over the
    grid ``lengths`` x ``widths``. Students, teacher and baseline settings are ``eval``'s (its cached students are
    reused)."""

    eval: EvalConfig
    lengths: List[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])  # generation budgets L (tokens per chain)
    widths: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # parallel chains W per question
    temperature: float = 1.5             # sampling temperature of the chains (0: greedy)
    items: Optional[int] = 100           # first N held-out questions (null = all)
    items_file: Optional[str] = None     # JSONL of chained-recall items; null = the embedded teacher's
    seed: int = 0
    hardware: Hardware = field(default_factory=Hardware)

    def __post_init__(self) -> None:
        for name in ("lengths", "widths"):
            v = getattr(self, name)
            if not v or not all(is_int(x) for x in v) or sorted(set(v)) != list(v):
                fail("hyperscale", name, v, "must be a non-empty increasing list of integers >= 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or self.temperature < 0:
            fail("hyperscale", "temperature", self.temperature, "must be a number >= 0 (0: greedy)")
        if self.items is not None:
            check_ints("hyperscale", self, ("items",))
        check_ints("hyperscale", self, ("seed",), lo=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HyperscaleConfig":
        d = dict(d)
        d["eval"] = EvalConfig.from_dict(d.get("eval") or {}, "eval")
        return from_dict(cls, d, "hyperscale")


def cr_key(cr: float) -> str:
    """The eval.json key of a CR: "4" for 4.0, "2.5" for 2.5."""
    return f"{float(cr):g}"


__all__ = ["EvalConfig", "HyperscaleConfig", "cr_key"]

"""Validated configuration dataclasses, the one place defaults live (no Hydra here: the launcher registers them in
Hydra's ConfigStore, workers rebuild them from the resolved YAML). Bad values raise ``ConfigError`` (one line)."""

from dms_megatron.config.base import (BAD_INPUT_EXIT_CODE, UNSET, ConfigError, MissingValue, check_choice, check_ints,
                                      fail, from_dict, is_int)
from dms_megatron.config.blend import DataBlend, parse_blend, parse_split
from dms_megatron.config.dms import ALPHA_PER, ALPHA_SOURCES, DMSConfig
from dms_megatron.config.press import PressConfig
from dms_megatron.config.model import ARCH_FIELDS, REQUIRED, SPECS, TINY_TEACHER, ModelConfig, check_same_arch
from dms_megatron.config.run import (KD_DIRECTIONS, PRECISIONS, RECALL_TASKS, TRAIN_MODES, DataConfig,
                                     LoggingConfig, ParallelConfig, RefitConfig, ResumeConfig, TrainConfig,
                                     check_batch_split, check_positions)

__all__ = ["BAD_INPUT_EXIT_CODE", "ConfigError", "MissingValue", "UNSET", "REQUIRED", "TINY_TEACHER", "check_choice", "check_ints", "fail", "from_dict", "is_int", "DMSConfig", "ALPHA_PER",
           "ALPHA_SOURCES", "ModelConfig", "SPECS", "ARCH_FIELDS", "check_same_arch", "TrainConfig",
           "DataConfig", "ParallelConfig", "LoggingConfig", "ResumeConfig", "RefitConfig", "KD_DIRECTIONS",
           "PRECISIONS", "RECALL_TASKS", "TRAIN_MODES", "PressConfig", "DataBlend", "parse_blend", "parse_split",
           "check_positions", "check_batch_split"]

"""DMS inference: a pure-torch decoder over HF tensor names, a per-head variable-length KV cache with physical
delayed eviction, a chunked-prefill / batched-decode engine with memory and read metrics, and baseline presses
(vanilla, TOVA, H2O, StreamingLLM, Quest)."""

from dms_megatron.inference.engine import Engine, SequenceMetrics, Session
from dms_megatron.inference.loading import from_megatron, load_hf, load_megatron, load_model, megatron_to_hf_state_dict
from dms_megatron.inference.model import DecoderModel, ModelLoadError
from dms_megatron.inference.press import PRESSES, Press, make_press

__all__ = ["Engine", "Session", "SequenceMetrics", "DecoderModel", "ModelLoadError", "load_hf", "load_megatron",
           "load_model", "from_megatron", "megatron_to_hf_state_dict", "Press", "make_press", "PRESSES"]

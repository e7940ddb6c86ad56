"""Qwen3 family (``Qwen3ForCausalLM``): Llama's layout and names plus a per-head RMSNorm on queries and keys
(q_norm / k_norm), no biases, full attention only. The official Qwen3-DMS modeling code loads its DMS exports."""

from dms_megatron.families.block import Block
from dms_megatron.families.family import Family

# Official Qwen3-DMS Hugging Face format (configuration_qwen3_dms.Qwen3ConfigDMS / train.py AUTO_MAP_CONFIG).
DMS_AUTO_MAP = {
    "AutoConfig": "configuration_qwen3_dms.Qwen3ConfigDMS",
    "AutoModel": "modeling_qwen3_dms.Qwen3ModelDMS",
    "AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3ForCausalLMDMS",
    "AutoModelForQuestionAnswering": "modeling_qwen3_dms.Qwen3ForQuestionAnsweringDMS",
    "AutoModelForSequenceClassification": "modeling_qwen3_dms.Qwen3ForSequenceClassificationDMS",
    "AutoModelForTokenClassification": "modeling_qwen3_dms.Qwen3ForTokenClassificationDMS",
}

FAMILY = Family(
    name="qwen3", architecture="Qwen3ForCausalLM", block=Block(qk_norm=True),
    refused={"attention_bias": "(bias on q/k/v/o) is not supported",
             "use_sliding_window": "is not supported (full attention only)"},
    hf_fixed={"attention_bias": False, "use_sliding_window": False, "sliding_window": None},
    dms_auto_map=DMS_AUTO_MAP,
)

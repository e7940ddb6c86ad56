"""Qwen2 family (Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen, ``Qwen2ForCausalLM``): Llama's layout and names plus a
bias on q / k / v (o_proj has none); full attention only."""

from dms_megatron.families.block import Block
from dms_megatron.families.family import Family

FAMILY = Family(
    name="qwen2", architecture="Qwen2ForCausalLM", block=Block(qkv_bias=True),
    refused={"use_sliding_window": "is not supported (full attention only)"},
    hf_fixed={"use_sliding_window": False, "sliding_window": None},
    llama3_rope=False,
)

"""Llama 3.x family (``LlamaForCausalLM``): the block and tensor names the other families build on; no biases."""

from dms_megatron.families.family import Family

FAMILY = Family(
    name="llama", architecture="LlamaForCausalLM",
    refused={"attention_bias": "(bias on q/k/v/o) is not supported"},
    hf_fixed={"attention_bias": False, "mlp_bias": False},
)

"""Mistral family (Mistral-7B v0.2 / v0.3 and its fine-tunes, ``MistralForCausalLM``): Llama's layout and names, no
biases. Full attention only: ``sliding_window`` must be null (v0.1's 4096-token window is refused)."""

from dms_megatron.families.family import Family

FAMILY = Family(
    name="mistral", architecture="MistralForCausalLM",
    refused={"sliding_window": "is not supported (full attention only; Mistral v0.2+ sets it to null)"},
    hf_fixed={"sliding_window": None},
)

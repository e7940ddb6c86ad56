"""Data: tokenizer, offline corpus, the synthetic long-range recall task, Megatron indexed datasets."""

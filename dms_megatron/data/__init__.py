"""Data: offline tokenizer, stdlib corpus (train / held-out split by file), the recall tasks, megatron indexed
datasets, and the embedded default's shipped teacher and re-fit data."""

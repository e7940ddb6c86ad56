"""``dms-eval``: DMS students against training-free KV-cache methods at matched memory, on one engine."""

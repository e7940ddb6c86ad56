"""Re-fitting: run configuration, training loop, checkpoints, logging, evaluation and reports."""

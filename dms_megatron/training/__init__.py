"""Re-fitting: the trainer and its stages, run inputs and initial weights, optimizer, metrics and logging,
preemption, the run config's resume policy, evaluation and reports; the teacher's pre-training."""

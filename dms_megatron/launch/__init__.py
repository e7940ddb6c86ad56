"""Launch layer: Hydra configuration, run directories, process spawning. Nothing below imports it."""

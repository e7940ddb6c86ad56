"""Launch layer: the command-line programs (Hydra launchers dms-refit / dms-eval / dms-dryrun, dms-convert,
dms-generate, dms-sweep-summary), the rank worker, local rank spawning. Nothing in the package imports it."""

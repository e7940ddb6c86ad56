# CPU / gloo: one node, 2 ranks (data parallel), one core each. What CI runs on its one-node localhost cluster.
SBATCH_ARGS=(--nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=01:00:00 --signal=B:USR1@60)
OVERRIDES=(parallel=dp2)  # 2 ranks: the config must say so (batch sizes are checked against it)

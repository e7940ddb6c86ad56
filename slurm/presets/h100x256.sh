# 256 x H100: 32 nodes x 8 GPUs, one task per GPU; tensor parallel 8 inside a node (NVLink), pipeline parallel 2
# across node pairs, data parallel 256 / (8 * 2) = 16. Checkpoint warning 10 minutes before the time limit.
SBATCH_ARGS=(--nodes=32 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=16 --exclusive --mem=0
             --time=04:00:00 --signal=B:USR1@600)
OVERRIDES=(parallel=h100_256)

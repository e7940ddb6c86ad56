#!/usr/bin/env bash
# Multi-node re-fit with torchrun, for bare-metal clusters and Kubernetes (e.g. a Kubeflow PyTorchJob, which sets
# MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK per pod). Run the same command on every node:
#
#   dms-refit --prepare-only hydra.run.dir=RUN model=qwen3-8b parallel=h100_256 ...   # once, on shared storage
#   NNODES=32 NPROC_PER_NODE=8 MASTER_ADDR=node0 launch/torchrun.sh RUN              # on every node
#
# Knobs (environment, defaults in brackets): NNODES [from RUN/config.yaml parallel.nnodes], NPROC_PER_NODE
# [parallel.nproc_per_node, else tp * pp], NODE_RANK [$RANK under a PyTorchJob, else 0], MASTER_ADDR [127.0.0.1],
# MASTER_PORT [29500], PYTHON [python]. Rendezvous is torchrun's c10d on MASTER_ADDR:MASTER_PORT.
# Each rank is `python -m dms_megatron.launch.worker --run-dir RUN`; rank 0 writes RUN/report.json at the end.
# A preempted job (SIGTERM/SIGUSR1/Ctrl-C reach the workers) checkpoints; run the same command again to resume.
set -euo pipefail
RUN_DIR=${1:?usage: launch/torchrun.sh RUN_DIR (its config.yaml written by dms-refit --prepare-only)}
PYTHON=${PYTHON:-python}
[ -s "$RUN_DIR/config.yaml" ] || { echo "error: $RUN_DIR/config.yaml does not exist: write it with" \
  "dms-refit --prepare-only hydra.run.dir=$RUN_DIR ..." >&2; exit 2; }
read -r CFG_NNODES CFG_NPROC < <("$PYTHON" - "$RUN_DIR/config.yaml" <<'PY'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))["parallel"]
print(p.get("nnodes") or 1, p.get("nproc_per_node") or p["tp"] * p["pp"])
PY
)
NNODES=${NNODES:-$CFG_NNODES}
NPROC_PER_NODE=${NPROC_PER_NODE:-$CFG_NPROC}
NODE_RANK=${NODE_RANK:-${RANK:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# torchrun must not inherit a PyTorchJob's per-pod RANK / WORLD_SIZE: it assigns the per-process ones itself
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
echo "node $NODE_RANK of $NNODES, $NPROC_PER_NODE ranks each, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --node-rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id "dms-refit-$(basename "$RUN_DIR")" \
  -m dms_megatron.launch.worker --run-dir "$RUN_DIR"

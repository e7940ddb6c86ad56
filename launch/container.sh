#!/usr/bin/env bash
# Run any dms-megatron command inside a CUDA PyTorch container (an NGC image keeps its own torch:
# `pip install -e .` adds only what the project needs). The checkout is mounted at /workspace/dms-megatron.
#
#   launch/container.sh dms-refit model=qwen3-8b embedded=false train.init_checkpoint=/data/ckpt ...
#   IMAGE=nvcr.io/nvidia/pytorch:25.01-py3 MOUNTS="-v /data:/data" launch/container.sh dms-eval
#   DRY_RUN=1 launch/container.sh dms-refit ...        # print the docker command instead of running it
#
# Knobs: IMAGE [nvcr.io/nvidia/pytorch:25.01-py3], MOUNTS [extra docker -v / -e flags], DOCKER [docker],
# GPUS [all]. The container runs with --ipc=host (NCCL and data loaders need shared memory).
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: launch/container.sh COMMAND [ARGS...]   (e.g. dms-refit dms.final_cr=8)" >&2; exit 2; }
IMAGE=${IMAGE:-nvcr.io/nvidia/pytorch:25.01-py3}
DOCKER=${DOCKER:-docker}
GPUS=${GPUS:-all}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC2206  # MOUNTS is a list of flags on purpose
CMD=("$DOCKER" run --rm --gpus "$GPUS" --ipc=host -v "$HERE:/workspace/dms-megatron" ${MOUNTS:-}
     -w /workspace/dms-megatron "$IMAGE" bash -c 'pip install -q -e . && exec "$@"' dms "$@")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"

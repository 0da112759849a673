#!/usr/bin/env bash
# RigL under torchrun, one node or several: DDP, or FSDP2 with ENGINE=fsdp2 (see launch/fsdp2.sh).
#   launch/torchrun.sh CONFIG.yaml [key=value ...]
# Environment (defaults: one node, every GPU, or 2 CPU processes without a GPU):
#   NNODES=1 NODE_RANK=0 NPROC_PER_NODE=<gpus|2> MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
# Multi-node: run the same command on every node with NNODES=N, its own NODE_RANK and node 0's MASTER_ADDR.
# SIGINT, SIGTERM and SIGUSR1 to torchrun reach every worker, which finishes its step, checkpoints and
# exits; torchrun waits SHUTDOWN_TIMEOUT seconds (default 300) for that before it kills them.
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG.yaml [key=value ...]}
shift
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
  -m rigl_ds.cli train "$config" engine.name="${ENGINE:-ddp}" "$@"

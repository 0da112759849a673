#!/usr/bin/env bash
# FSDP2 (fully_shard) RigL under torchrun, one node or several: launch/torchrun.sh with engine.name=fsdp2.
#   launch/fsdp2.sh CONFIG.yaml [key=value ...]
# Environment as launch/torchrun.sh (NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT).
set -euo pipefail
ENGINE=fsdp2 exec bash "$(dirname "$0")/torchrun.sh" "$@"

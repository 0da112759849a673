#!/usr/bin/env bash
# RigL as a DeepSpeed plugin (ZeRO 0-3) under the `deepspeed` launcher.
#   launch/deepspeed.sh CONFIG.yaml DS_CONFIG.json [key=value ...]
# Single node: every GPU (or NUM_GPUS=N; 2 CPU processes without a GPU).
# Multi-node with a hostfile (MPI style, "worker-0 slots=8" per line; pdsh/ssh between nodes):
#   HOSTFILE=hostfile launch/deepspeed.sh configs/imagenet/resnet50_erk_s90_e100.yaml ds_configs/zero2_bf16.json
# Multi-node without ssh (run once per node, e.g. from SLURM): NO_SSH=1 NNODES=2 NODE_RANK=<i> MASTER_ADDR=<node 0>
# The DeepSpeed JSON holds no RigL keys; its batch sizes are filled from (or checked against) the YAML.
# SIGINT, SIGTERM or SIGUSR1 to this script (or to the job) stop every rank after its current step with a
# checkpoint: the signal goes on as SIGTERM to DeepSpeed's per-node launcher, which signals the ranks and
# waits 30 s for them (the single-node `deepspeed` runner itself forwards nothing).
set -euo pipefail
config=${1:?usage: launch/deepspeed.sh CONFIG.yaml DS_CONFIG.json [key=value ...]}
ds_config=${2:?usage: launch/deepspeed.sh CONFIG.yaml DS_CONFIG.json [key=value ...]}
shift 2
args=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
elif [ -n "${NO_SSH:-}" ]; then
  args+=(--no_ssh --num_nodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}")
fi
if [ -n "${NUM_GPUS:-}" ]; then
  args+=(--num_gpus "$NUM_GPUS")
elif ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  args+=(--num_gpus 2)   # CPU: two gloo processes
fi
deepspeed "${args[@]}" --module rigl_ds.cli train "$config" engine.name=deepspeed \
  engine.deepspeed_config="$ds_config" "$@" &
runner=$!
forward() {
  if [ -n "${HOSTFILE:-}" ]; then
    kill -TERM "$runner" 2>/dev/null || true          # the multi-node runner signals its pdsh launchers
  else
    pkill -TERM -P "$runner" 2>/dev/null || true      # the per-node launcher (launch.py) under the runner
  fi
}
trap forward INT TERM USR1
rc=0
while :; do
  wait "$runner" && rc=0 || rc=$?
  kill -0 "$runner" 2>/dev/null || break               # a trapped signal ends `wait` early: wait again
done
exit "$rc"

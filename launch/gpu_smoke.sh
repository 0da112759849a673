#!/usr/bin/env bash
# GPU smoke test of the ImageNet kit on one CUDA GPU (sized to finish in under 8 minutes on one H100;
# it has not run on a GPU yet, so that is a target, not a measurement):
# DALI GPU pipeline on a generated JPEG folder, ResNet-50 dense vs RigL with AMP + channels-last
# (img/s of each in the same run, mask-update time), then `rigl-ds train` on an ImageNet YAML with
# data.backend=dali-gpu.
#   launch/gpu_smoke.sh [--steps 300] [--dtype bf16|fp16] [--batch 256]
# Output: the printed summary, runs/gpu_smoke/smoke.json and runs/gpu_smoke/semi_structured.json. Needs `pip install -e .[dali]`.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${SMOKE_DIR:-$(mktemp -d)}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
if [ ! -d "$work/imagenet/train" ]; then
  python -m rigl_ds.data.testing "$work/imagenet" --classes 16 --train 96 --val 32 --min-size 200 --max-size 500
fi
mkdir -p runs/gpu_smoke
python benchmarks/gpu_smoke.py --folder "$work/imagenet" --run-dir "$work/run" --json runs/gpu_smoke/smoke.json "$@"
# 2:4: semi-structured export vs dense (inference) and a RigL 2:4 training step vs dense (about a minute)
python benchmarks/semi_structured.py --json runs/gpu_smoke/semi_structured.json

#!/usr/bin/env bash
# Step-time and memory benchmark on a CUDA device, at the paper's sizes (not --quick):
# mnist-ae batch 1000, resnet32 and vgg16 batch 128 (3x32x32), every method, windows of 100
# iterations (a whole multiple of T=20, T1=10, T2=100), methods interleaved, CUDA synchronised
# around every window, peak memory = torch.cuda.max_memory_allocated in a fresh process per
# method. Writes bench/results/step_time-<problem>-cuda.json and prints the tables.
#
#   bash bench/gpu.sh                       # all three problems, 5 repeats
#   REPEATS=3 PROBLEMS=resnet32 bash bench/gpu.sh
#
# Run from the repository root (or anywhere: it changes to it). Uses .venv/bin/python when
# present, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PROBLEMS=${PROBLEMS:-mnist-ae,resnet32,vgg16}
REPEATS=${REPEATS:-5}
DEVICE=${DEVICE:-cuda}
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name(0) if ok else 'no CUDA device'); sys.exit(0 if ok else 1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for p in ${PROBLEMS//,/ }; do
  "$PY" bench/step_time.py --problems "$p" --device "$DEVICE" --repeats "$REPEATS" \
      --window 100 --out "bench/results/step_time-$p-cuda.json"
done

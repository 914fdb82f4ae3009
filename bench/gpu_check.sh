#!/usr/bin/env bash
# GPU check for a lent GPU machine (never CI): install on top of the machine's CUDA torch, run, keep results.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e . 2>&1 | grep -v "^WARNING" || true
PYTHONUNBUFFERED=1 python3 bench/gpu_check.py
# ZeRO-3 loading, whole vs partitioned: peak GPU memory of loading and of deepspeed.initialize, one rank per GPU
# (a comparison needs two GPUs or more: with one, a partition is the whole model).
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  PYTHONUNBUFFERED=1 python3 bench/zero3_loading.py --gpu --world "$gpus" --hidden 2048 --layers 16
else
  echo "bench/zero3_loading.py --gpu skipped: $gpus GPU(s); partitioned vs whole loading needs 2 or more"
fi

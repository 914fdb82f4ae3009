#!/usr/bin/env bash
# GPU check for a lent GPU machine (never CI): install on top of the machine's CUDA torch, run, keep results.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e . 2>&1 | grep -v "^WARNING" || true
PYTHONUNBUFFERED=1 python3 bench/gpu_check.py

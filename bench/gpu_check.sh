#!/usr/bin/env bash
# Every CUDA path of Tuneline in one go (training bf16/compile, packed K=16, export on the CUDA provider, the
# serving benchmark on the GPU), under 8 minutes, one JSON report; on a CPU-only machine it reports what it
# skipped and why. The steps and limits are in bench/gpu_check.py.
#   bench/gpu_check.sh [--out gpu_check.json] [--only export_cuda,serving_gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
exec "$PY" bench/gpu_check.py "$@"

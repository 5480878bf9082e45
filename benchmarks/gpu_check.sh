#!/usr/bin/env bash
# The GPU check, run on a machine with a GPU and cupy (one command):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the cupy test suite (every test parametrised over backends, cupy float64 and float32,
#    same host-generated inputs, compared with numpy / float64 references);
# 2. the GPU benchmark (vqref on cupy vs numpy vs vector-quantize-pytorch on CUDA).
# Wheels for packages the machine lacks may be put in .whl/ (array-api-compat, array-api-strict,
# vector-quantize-pytorch and its small dependencies); they are installed to /tmp/site.
set -uo pipefail
out="${1:-${OUT:-/tmp/vqref-gpu}}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L || true
python3 -c "import cupy, numpy, array_api_compat; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'array_api_compat', array_api_compat.__version__)"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
python3 -m pytest tests -m gpu -o addopts="" -p no:cacheprovider -q $workers 2>&1 | tee "$out/gpu_tests.log" | tail -40
python3 benchmarks/gpu.py --json "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"

#!/bin/sh
# The one prepared GPU check: the GPU benchmark and the GPU tests, on one machine with one
# CUDA GPU and the project installed (`pip install -e '.[dev]'`, or the image of
# infra/docker). Sized to finish within ~10 minutes: the benchmark stops adding compiled
# rows after --budget-s (420 s), the tests take well under a minute.
#
#   infra/gpu/check.sh [OUTPUT_DIR]      (default: ./gpu-check)
#
# OUTPUT_DIR receives bench_gpu.txt (its last line is the JSON of the figures) and
# pytest_gpu.txt. Exit status: non-zero if either failed.
set -u
OUT_DIR=${1:-gpu-check}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
    "infra/gpu/check.sh: no CUDA GPU visible to torch")' || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    > "$OUT_DIR/gpu.txt" 2>&1 || true
timeout 540 "$PY" -m jobs.bench_gpu 2>&1 | tee "$OUT_DIR/bench_gpu.txt"
bench=$?
timeout 240 "$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT_DIR/pytest_gpu.txt"
tests=$?
echo "bench_gpu: exit $bench; GPU tests: exit $tests; output in $OUT_DIR"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]

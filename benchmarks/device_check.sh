#!/usr/bin/env bash
# The GPU checks in one command, for a GPU machine that has Python, PyTorch and the NVIDIA stack but no network
# (the wheels of everything else travel in .whl/, made here by `make device-wheels`):
#
#   bash benchmarks/device_check.sh [--quick]
#
# 1. installs .whl/ into /tmp/site (no index, no dependencies: the image's torch stays);
# 2. tests/test_cuda.py: the default model, half precision, the service and training on the GPU;
# 3. benchmarks/service_bench.py on the GPU: batching, cache, latency and regions figures (issue 5's goals).
# Logs and result JSON go to $OUT (default runs/device-check). DEVICE=cpu rehearses it all on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-check}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT/results"
status=0

"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install .whl/ (run 'make device-wheels' first)"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIXELLLM_TEST_DEVICE="$DEVICE"
{ command -v nvidia-smi >/dev/null && nvidia-smi -L; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } \
    | tee "$OUT/machine.txt"

"$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" \
    || status=1
"$PYTHON" benchmarks/service_bench.py --device "$DEVICE" --results-dir "$OUT/results" "$@" \
    --note "benchmarks/device_check.sh on $(hostname)" 2>&1 | tee "$OUT/service_bench.log" || status=1
exit $status

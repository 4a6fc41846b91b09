#!/usr/bin/env bash
# The CUDA path's check, in one run on the GPU machine (one H200; Python 3.12, torch 2.11,
# Triton 3.6; no network): the `gpu` and `triton` tests on CUDA, then tools/gpu_bench.py's
# figures (decode vs the HBM roofline, prefill vs the bf16 matmul peak, CUDA graphs vs eager,
# the Triton decode kernel vs the copy bandwidth). Under 8 minutes: the tests get 4 at most,
# the benchmark 3.5.
#
#   here:   tools/fetch_gpu_wheels.sh       # msgspec + pyzmq wheels into .gpu-wheels/ (carry it)
#   there:  tools/gpu_check.sh [OUT_DIR]    # logs and gpu_bench.json land in OUT_DIR ($OUT, else /tmp/gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/gpu-check}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False
export PYTHONPATH="$PWD"
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tetri-site \
    .gpu-wheels/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/tetri-site"
fi
python3 -c "import torch, triton, msgspec; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name())" || exit 1
status=0
parallel=""
python3 -c "import xdist" 2>/dev/null && parallel="-n 8"  # compiles the Triton variants in parallel
timeout 240 python3 -m pytest -q -m "gpu or triton" tests/engine tests/triton $parallel -p no:cacheprovider \
  2>&1 | tee "$OUT_DIR/pytest.log" || status=1
timeout 210 python3 tools/gpu_bench.py --json "$OUT_DIR/gpu_bench.json" 2>&1 | tee "$OUT_DIR/gpu_bench.log" \
  || status=1
exit $status

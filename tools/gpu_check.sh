#!/usr/bin/env bash
# The CUDA path's check, in one run on the GPU machine (one H200; Python 3.12, torch 2.11,
# Triton 3.6; no network): the `gpu` and `triton` tests on CUDA; tools/gpu_bench.py's figures
# (decode vs the HBM roofline, prefill vs the bf16 matmul peak, CUDA graphs vs eager, the Triton
# decode kernel vs the copy bandwidth); then tools/gpu_serve_check.py: the KV handoff (CUDA IPC
# and host-staged against a raw device-to-device copy, 128-8192-token prompts), and tetri-serve
# on one GPU in both modes (`--gpus 0 --prefill-gpus 0 --decode-gpus 0` and `--mode colocated`)
# driven by the openai SDK, greedy output against the offline engine, every block free after,
# tetri-bench side by side. Under 8 minutes (an estimate: it has never run): the tests get 120 s
# at most, the benchmark 150 s, the server check 210 s (it skips, and says so, what would not fit). Both benchmarks share one 8B-shaped
# random checkpoint.
#
#   here:   tools/fetch_gpu_wheels.sh       # wheels + two trace files into .gpu-wheels/ (carry it)
#   there:  tools/gpu_check.sh [OUT_DIR]    # logs and JSON land in OUT_DIR ($OUT, else /tmp/gpu-check)
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
[ -d .gpu-wheels/traces ] && export TETRI_TRACES_DIR="$PWD/.gpu-wheels/traces"
MODEL_DIR="${TETRI_GPU_MODEL_DIR:-/tmp/tetri-8b-random}"
python3 -c "import torch, triton, msgspec; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name())" || exit 1
status=0
parallel=""
python3 -c "import xdist" 2>/dev/null && parallel="-n 8"  # compiles the Triton variants in parallel
timeout 120 python3 -m pytest -q -m "gpu or triton" tests/engine tests/triton tests/transfer $parallel \
  -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest.log" || status=1
timeout 150 python3 tools/gpu_bench.py --json "$OUT_DIR/gpu_bench.json" --model-dir "$MODEL_DIR" 2>&1 \
  | tee "$OUT_DIR/gpu_bench.log" || status=1
timeout 210 python3 tools/gpu_serve_check.py --model-dir "$MODEL_DIR" --json "$OUT_DIR/gpu_serve.json" \
  --budget-s 200 2>&1 | tee "$OUT_DIR/gpu_serve.log" || status=1
exit $status

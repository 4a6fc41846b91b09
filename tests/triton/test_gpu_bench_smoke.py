"""tools/gpu_bench.py's CPU smoke path runs every section the GPU run prints (tiny model,
Triton kernels under the interpreter), so the GPU tool is not dead code; and the GPU check
scripts are valid bash. (On a GPU, tools/gpu_check.sh runs the real benchmark instead.)"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from tests.triton.conftest import HAS_CUDA

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[2]
# tools/gpu_bench.py's TINY config: 2 layers, hidden 64, 4 heads of 16, 2 kv heads, vocab 320, fp32.
KV_TOKEN_BYTES = 2 * 2 * 2 * 16 * 4
WEIGHT_BYTES = (2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128) + 64 * 320) * 4


@pytest.mark.skipif(HAS_CUDA, reason="the smoke path is the CPU one; gpu_check.sh runs the GPU benchmark")
def test_cpu_smoke_runs_every_section(tmp_path):
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "tools" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run(smoke=True, keep_dir=str(tmp_path))
    assert r["device"] == "cpu" and r["copy_GBps"] > 0 and r["matmul_TFLOPs"] > 0
    assert [row["batch"] for row in r["decode"]] == [1, 4]
    for row in r["decode"]:
        lo, hi = (int(x) for x in row["context"].split("-"))
        total = lo if row["batch"] == 1 else sum(16 + 48 * i // 3 for i in range(4))
        assert row["bytes_read"] == WEIGHT_BYTES + total * KV_TOKEN_BYTES
        assert row["roofline_ms"] == pytest.approx(row["bytes_read"] / (r["copy_GBps"] * 1e9) * 1e3)
        assert row["roofline_share"] == pytest.approx(row["roofline_ms"] / row["step_ms"])
        assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["step_ms"] * 1e3)
    assert [row["chunk"] for row in r["prefill"]] == [32, 64] and all(row["tflops"] > 0 for row in r["prefill"])
    assert [row["batch"] for row in r["graphs"]] == [1, 4]
    assert all(row["eager_ms"] > 0 and row["graph_ms"] is None for row in r["graphs"])  # no CUDA: eager only
    (kernel,) = r["kernel"]
    assert kernel["bytes_per_s"] == pytest.approx(4 * 64 * KV_TOKEN_BYTES / 2 / (kernel["kernel_us"] / 1e6))


def test_gpu_check_script_is_valid_bash():
    for script in ("tools/gpu_check.sh", "tools/fetch_gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)

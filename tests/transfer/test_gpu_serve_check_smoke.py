"""tools/gpu_serve_check.py's CPU smoke path runs every section the GPU run prints (two processes
for the handoff, the offline engine, both server modes through the openai SDK, tetri-bench), so
the GPU tool is not dead code. (On a GPU, tools/gpu_check.sh runs the real check instead.)"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ("greedy_equals_offline", "stream_equals_offline", "n2_both_equal_offline", "seeded_sampling_repeats",
          "sampled_length", "all_blocks_free", "all_blocks_free_after_bench")


def test_cpu_smoke_runs_every_section(tmp_path, default_model_dir):
    from tools import gpu_serve_check  # a namespace package: its child processes can import it by name

    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as done:
        gpu_serve_check.main(["--cpu-smoke", "--json", str(out)])
    assert done.value.code == 0
    r = json.loads(out.read_text())
    assert [row["tokens"] for row in r["handoff"]] == [128, 512]
    for row in r["handoff"]:
        assert not [k for k in row if k.endswith("_error")], row
        for path in ("raw", "shm", "host_staged"):
            assert row[f"{path}_GBps"] == pytest.approx(row["MB"] / row[f"{path}_ms"])
    assert set(r["modes"]) == {"disagg", "colocated"}
    for name, mode in r["modes"].items():
        assert all(mode[k] is True for k in CHECKS), (name, mode)
        assert mode["concurrent_total"] == 2 and mode["bench"]["completed"] == 6
        assert set(mode["blocks_used_after"].values()) == {0}
    assert r["modes"]["disagg"]["kv_transfer"] == {"1": {"0": "shm"}}
    assert r["modes"]["disagg"]["server_handoff"]["handoffs"] > 0 and r["modes"]["colocated"]["server_handoff"] == {}
    assert r["modes"]["disagg"]["handoff_blocks"]["cached"] > 0 and r["modes"]["disagg"]["handoff_blocks"]["copied"] > 0

"""tools/sim_dispatch_balance.py (RESULTS.md finding 3's figures) on a tiny simulated run."""

import json

from tests.tools import load_tool


def _tool():
    return load_tool("sim_dispatch_balance")


def test_peak_resident_counts_overlaps_exactly():
    tool = _tool()
    assert tool.peak_resident([]) == 0
    assert tool.peak_resident([(0, 2), (1, 3), (2, 4)]) == 2  # an end at t closes before a start at t
    assert tool.peak_resident([(0, 10), (1, 2), (1.5, 3), (2.5, 4)]) == 3


def test_balance_summary_on_a_tiny_run(tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "s.json"
    argv = ["--mode", "tetri", "--workload", "random", "--num-requests", "120", "--rate", "40", "--gpus", "4",
            "--prefill", "1", "--decode", "3", "--max-output-tokens", "64", "--seed", "1",
            "--slo", "ttft=1,tpot=0.05", "--summary-json", str(out)]
    assert tool.main(argv) == 0
    summary = json.loads(out.read_text())
    rows = summary["workers"]
    assert set(rows) == {"1", "2", "3"}  # worker 0 prefills
    assert sum(r["requests"] for r in rows.values()) == 120
    assert all(1 <= r["peak_resident"] <= r["requests"] and 0 <= r["heavy"] <= r["requests"] for r in rows.values())
    assert 0.0 <= summary["heavy_share_spread"] <= 1.0 and summary["tpot_p99_ms"] > 0
    assert "peak" in capsys.readouterr().out

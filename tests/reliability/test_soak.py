"""A short run of tools/soak.py (30 s) on the package's shared 1-prefill + 1-decode server:
it runs, and its numbers are sane. Flatness is only checked against a generous bound here
(30 s is short); long runs are `python tools/soak.py --duration-s 180` and longer."""

from __future__ import annotations

import json

from tests.reliability.helpers import load_tool


def test_soak_short_run_reports_sane_numbers(shared_server):
    soak = load_tool("soak")
    rep = soak.main(["--duration-s", "30", "--sample-every-s", "3", "--warmup-s", "10", "--concurrency", "4",
                     "--rate", "10"], server=shared_server)
    brief = {k: v for k, v in rep.items() if k != "series_mib"}
    print(json.dumps(brief))
    assert shared_server.proc.poll() is None  # a shared server is neither started nor stopped by the tool
    assert rep["num_samples"] >= 8, brief
    assert set(rep["processes"]) == {"front", "w0-prefill", "w1-decode"}, brief
    for name, p in rep["processes"].items():
        assert len(p["pids"]) == 1, (name, p)
        assert 50 <= p["rss_after_warmup_mib"] <= 8192 and 50 <= p["rss_end_mib"] <= 8192, (name, p)
        assert p["rss_max_mib"] >= p["rss_end_mib"] and abs(p["growth_pct"]) < 50, (name, p)
    assert rep["completed"] >= 50 and rep["tokens_received"] > 0, brief
    assert rep["errored"] == 0 and rep["hung"] == 0, brief
    assert rep["drained"] and rep["leaked_blocks"] == 0 and rep["num_running_after"] == 0, brief
    assert rep["worker_restarts"] == 0, brief
    assert rep["warmup_sample_t"] >= 10 and rep["end_sample_t"] >= 29, brief

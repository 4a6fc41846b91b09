"""A short run of tools/soak.py (12 s) on the package's shared 1-prefill + 1-decode server:
it runs, and its numbers are sane. Flatness is only checked against a generous bound here
(12 s is short); long runs are `python tools/soak.py --duration-s 180` and longer. Nothing
here depends on how fast the machine is: counts are checked against each other, not
against the clock."""

from __future__ import annotations

import json

from tests.reliability.helpers import load_tool

DURATION_S = 12.0


def test_soak_short_run_reports_sane_numbers(shared_server):
    soak = load_tool("soak")
    rep = soak.main(["--duration-s", str(DURATION_S), "--sample-every-s", "1.5", "--warmup-s", "4",
                     "--concurrency", "4", "--rate", "10"], server=shared_server)
    brief = {k: v for k, v in rep.items() if k != "series_mib"}
    print(json.dumps(brief))
    assert shared_server.proc.poll() is None  # a shared server is neither started nor stopped by the tool
    assert set(rep["processes"]) == {"front", "w0-prefill", "w1-decode"}, brief
    for name, p in rep["processes"].items():
        assert len(p["pids"]) == 1, (name, p)
        assert 50 <= p["rss_after_warmup_mib"] <= 8192 and 50 <= p["rss_end_mib"] <= 8192, (name, p)
        assert p["rss_max_mib"] >= p["rss_end_mib"] and abs(p["growth_pct"]) < 50, (name, p)
    # every request sent ended normally (some clients hang up on purpose), none failed or hung
    assert rep["errored"] == 0 and rep["hung"] == 0, brief
    assert rep["completed"] + rep["cancelled"] == rep["requests"] and rep["completed"] >= 4, brief
    assert rep["tokens_received"] >= rep["completed"] * 8, brief  # max_tokens is 8..64, ignore_eos
    assert rep["drained"] and rep["leaked_blocks"] == 0 and rep["num_running_after"] == 0, brief
    assert rep["worker_restarts"] == 0, brief
    # the memory series spans the run: a sample after the warm-up, and the last one at its end
    assert 4 <= rep["warmup_sample_t"] < rep["end_sample_t"] and rep["end_sample_t"] >= DURATION_S, brief

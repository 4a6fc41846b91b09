"""build_report on hand-made records: exact expected numbers, SLO attainment, goodput."""

from __future__ import annotations

import io
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetri.bench import RequestRecord, Slo, build_report
from tetri.bench.report import (LATENCY_KEYS, REPORT_KEYS, SLO_KEYS, max_rate_at, plot_latency_cdfs,
                                plot_sweep, print_report, summarize, sweep_entry)

approx = pytest.approx


def hand_records() -> list[RequestRecord]:
    return [
        # meets ttft<=0.4 and tpot<=0.2 (tpot = 1.0/10 = 0.1)
        RequestRecord(prompt_tokens=100, output_tokens=11, ttft_s=0.1, e2e_s=1.1, itl_s=[0.1] * 10),
        # misses TTFT (0.5 > 0.4); tpot 0.4/4 = 0.1
        RequestRecord(prompt_tokens=200, output_tokens=5, ttft_s=0.5, e2e_s=0.9, itl_s=[0.1] * 4),
        # one token: no TPOT, judged on TTFT alone -> meets
        RequestRecord(prompt_tokens=300, output_tokens=1, ttft_s=0.2, e2e_s=0.2, itl_s=[]),
        # misses TPOT: (1.3 - 0.3)/2 = 0.5
        RequestRecord(prompt_tokens=400, output_tokens=3, ttft_s=0.3, e2e_s=1.3, itl_s=[0.2, 0.8]),
        # failed: counts as missing the SLO
        RequestRecord(prompt_tokens=500, ok=False, error="HTTP 500"),
    ]


def test_report_exact_numbers_with_slo():
    slo = Slo(ttft_s=0.4, tpot_s=0.2)
    report = build_report(hand_records(), 2.0, slo, config={"rate": 3.0})
    assert set(report) == REPORT_KEYS | SLO_KEYS
    assert report["completed"] == 4 and report["failed"] == 1
    assert report["duration_s"] == 2.0
    assert report["request_throughput"] == approx(2.0)
    assert report["input_token_throughput"] == approx(1000 / 2.0)
    assert report["output_token_throughput"] == approx(20 / 2.0)
    assert report["mean_prompt_tokens"] == approx(250.0)
    assert report["mean_output_tokens"] == approx(5.0)
    # numpy linear percentiles of [0.1, 0.2, 0.3, 0.5]
    assert report["ttft_s"] == approx({"mean": 0.275, "p50": 0.25, "p90": 0.44, "p99": 0.494})
    # TPOT of A, B, D = [0.1, 0.1, 0.5]; C has one token and no TPOT
    assert report["tpot_s"] == approx({"mean": 0.7 / 3, "p50": 0.1, "p90": 0.42, "p99": 0.492})
    # ITL pooled: 14 x 0.1, 0.2, 0.8
    assert report["itl_s"] == approx({"mean": 0.15, "p50": 0.1, "p90": 0.15, "p99": 0.71})
    assert report["e2e_s"] == approx({"mean": 3.5 / 4, "p50": 1.0, "p90": 1.24, "p99": 1.294})
    # DistServe attainment: A and C meet both, out of 5 requests (the failed one included)
    assert report["slo_attainment"] == approx(2 / 5)
    assert report["goodput"] == approx(2 / 2.0)
    assert report["slo"] == {"ttft_s": 0.4, "tpot_s": 0.2}
    assert report["config"] == {"rate": 3.0}
    json.dumps(report, allow_nan=False)


def test_report_without_slo_has_no_slo_keys():
    report = build_report(hand_records(), 4.0)
    assert set(report) == REPORT_KEYS
    assert report["request_throughput"] == approx(1.0)
    assert report["config"] == {}


def test_only_one_slo_part_and_tight_slo():
    records = hand_records()
    assert build_report(records, 1.0, Slo.parse("ttft=0.4"))["slo_attainment"] == approx(3 / 5)
    assert build_report(records, 1.0, Slo.parse("tpot=0.2"))["slo_attainment"] == approx(3 / 5)
    assert build_report(records, 1.0, Slo(ttft_s=0.01, tpot_s=0.01))["slo_attainment"] == 0.0
    assert build_report(records, 1.0, Slo(ttft_s=10, tpot_s=10))["goodput"] == approx(4.0)


def test_empty_and_all_failed_reports():
    empty = build_report([], 0.0, Slo(1, 1))
    assert empty["completed"] == 0 and empty["failed"] == 0
    assert empty["request_throughput"] == 0.0 and empty["slo_attainment"] == 0.0
    assert all(empty[k] == {"mean": None, "p50": None, "p90": None, "p99": None} for k in LATENCY_KEYS)
    failed = build_report([RequestRecord(prompt_tokens=5, ok=False, error="x")] * 3, 1.0, Slo(1, 1))
    assert failed["failed"] == 3 and failed["slo_attainment"] == 0.0 and failed["mean_prompt_tokens"] is None
    json.dumps(failed, allow_nan=False)


def test_record_tpot_property():
    assert RequestRecord(prompt_tokens=1, output_tokens=5, ttft_s=1.0, e2e_s=3.0).tpot_s == approx(0.5)
    assert RequestRecord(prompt_tokens=1, output_tokens=1, ttft_s=1.0, e2e_s=1.0).tpot_s is None
    assert RequestRecord(prompt_tokens=1, ok=False).tpot_s is None


def test_slo_parse():
    assert Slo.parse("ttft=0.5,tpot=0.05") == Slo(ttft_s=0.5, tpot_s=0.05)
    assert Slo.parse(" tpot_s=0.1 , ttft=2 ") == Slo(ttft_s=2.0, tpot_s=0.1)
    assert math.isinf(Slo.parse("ttft=1").tpot_s)
    for bad in ("", "ttft", "e2e=1", "ttft=-1", "ttft=abc"):
        with pytest.raises(ValueError):
            Slo.parse(bad)


def test_summarize_and_sweep_helpers():
    assert summarize([2.0]) == {"mean": 2.0, "p50": 2.0, "p90": 2.0, "p99": 2.0}
    sweep = [{"rate": 1.0, "slo_attainment": 1.0}, {"rate": 4.0, "slo_attainment": 0.5},
             {"rate": 2.0, "slo_attainment": 0.9}]
    assert max_rate_at(sweep) == 2.0
    assert max_rate_at(sweep, 0.95) == 1.0
    assert max_rate_at([{"rate": 1.0, "slo_attainment": 0.1}]) is None
    entry = sweep_entry(3.0, build_report(hand_records(), 2.0, Slo(0.4, 0.2)))
    assert entry["rate"] == 3.0 and entry["slo_attainment"] == approx(0.4) and entry["goodput"] == approx(1.0)


def test_table_and_plots(tmp_path):
    from rich.console import Console

    records = hand_records()
    report = build_report(records, 2.0, Slo(0.4, 0.2))
    report["sweep"] = [sweep_entry(1.0, report), sweep_entry(2.0, report)]
    report["max_rate_at_90"] = None
    out = io.StringIO()
    print_report(report, Console(file=out, width=120))
    text = out.getvalue()
    assert "TTFT" in text and "SLO attainment" in text and "40.0%" in text
    cdf = plot_latency_cdfs({"a": records, "b": records[:2]}, tmp_path / "p" / "cdf.png", Slo(0.4, 0.2))
    sweep = plot_sweep(report["sweep"], tmp_path / "p" / "sweep.png")
    for path in (cdf, sweep):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


record_strategy = st.builds(
    lambda ok, out, ttft, extra: RequestRecord(prompt_tokens=10, output_tokens=out if ok else 0,
                                               ttft_s=ttft if ok else None, e2e_s=ttft + extra if ok else None,
                                               ok=ok),
    st.booleans(), st.integers(1, 50), st.floats(0.0, 5.0), st.floats(0.0, 5.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(record_strategy, max_size=30), st.floats(0.1, 100.0), st.floats(0.01, 5), st.floats(0.01, 5))
def test_report_invariants(records, duration_s, ttft_slo_s, tpot_slo_s):
    report = build_report(records, duration_s, Slo(ttft_slo_s, tpot_slo_s))
    assert report["completed"] + report["failed"] == len(records)
    assert 0.0 <= report["slo_attainment"] <= 1.0
    assert report["goodput"] <= report["request_throughput"] + 1e-9
    if report["completed"]:
        stats = report["ttft_s"]
        assert stats["p50"] <= stats["p90"] + 1e-12 <= stats["p99"] + 2e-12

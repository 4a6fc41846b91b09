"""tools/sim_results.py on a tiny workload: the runs, the table, the vs-best column, the section."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = "--gpus 3 --model-preset llama3-8b --hardware h200 --seed 0 --chunk-size 512"


def _tool():
    spec = importlib.util.spec_from_file_location("tetri_tools_sim_results", ROOT / "tools" / "sim_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _tiny_plan(tool):
    tool.PLAN_FLAGS = "--max-requests 150 --num-requests 60 --window-s 2"


def test_tiny_table_end_to_end(tmp_path):
    tool = _tool()
    _tiny_plan(tool)
    tiny = tool.Workload("tiny", "--workload random", (1, 2), (("20 req/s", "--rate 20"), ("60 req/s", "--rate 60")))
    results = tool.run_all((tiny,), ["colocated-chunked", "disagg", "auto"], 40, COMMON)
    rows = results["tiny"]["60 req/s"]
    assert list(rows) == ["colocated-chunked", "disagg", "auto@50 ms", "auto@25 ms"]
    for row in rows.values():
        for label in ("50 ms", "25 ms"):
            assert 0.0 <= row["attainment"][label] <= 1.0
        assert row["goodput"]["25 ms"] <= row["goodput"]["50 ms"]  # the tighter SLO never admits more
    chunked = rows["colocated-chunked"]
    assert chunked["goodput"]["50 ms"] > 0 and chunked["roles_final"] == {"mixed": 3}
    lines = tool.render(results, 40, 12.0, (tiny,))
    assert lines[0].startswith("## Issue 19") and "in 0.2 minutes" in lines[2]
    table = [line for line in lines if line.startswith("| tiny |")]
    assert len(table) == 8
    best = max(rows[m]["goodput"]["25 ms"] for m in ("colocated-chunked", "disagg"))
    auto25 = next(line for line in table if "| 60 req/s | auto@25 ms |" in line)
    cells = [c.strip() for c in auto25.split("|")]
    assert cells[-2] == f"{rows['auto@25 ms']['goodput']['25 ms'] / best:.2f}x" and cells[-3] == ""
    start = tool.plan_start(tiny, dict(tool.SLOS)["25 ms"], COMMON)
    assert cells[4].startswith(("all mixed" if start is None else f"{start[0]}:{start[1]}") + " -> ")
    baseline = next(line for line in table if "| 60 req/s | disagg |" in line)
    assert [c.strip() for c in baseline.split("|")][-3:-1] == ["", ""]
    assert "--mode MODE" in "\n".join(lines)


def test_goodput_is_met_requests_per_second_of_arrivals():
    tool = _tool()
    row = tool.simulate_row(tool.run_flags(tool.Workload("t", "--workload lpld", (1, 2), ()), "--rate 50",
                                           "colocated-chunked", 30, COMMON))
    # lpld at 50 req/s on 3 GPUs meets every SLO: goodput is the offered rate over the arrival span
    assert row["attainment"]["25 ms"] == 1.0
    assert row["goodput"]["25 ms"] == pytest.approx(50, rel=0.5)
    assert row["failed"] == 0 and row["flips"] == 0


def test_write_section_replaces_only_between_the_markers(tmp_path):
    tool = _tool()
    path = tmp_path / "R.md"
    path.write_text("# head\n\nkeep me\n")
    section = f"{tool.BEGIN}\nfirst\n{tool.END}\n"
    tool.write_section(path, section)
    assert path.read_text() == f"# head\n\nkeep me\n\n{section}"
    path.write_text(path.read_text() + "\n## after\n")
    tool.write_section(path, f"{tool.BEGIN}\nsecond\n{tool.END}\n")
    assert path.read_text() == f"# head\n\nkeep me\n\n{tool.BEGIN}\nsecond\n{tool.END}\n\n## after\n"


def test_auto_starts_from_tetri_plans_choice():
    """auto@X starts where tetri-plan's search for SLO X lands: on 3 GPUs plan picks colocated-chunked
    for HPHD (auto starts all mixed) and a 2:1 tetri split for LPHD (auto starts 2 prefill, 1 decode)."""
    tool = _tool()
    _tiny_plan(tool)
    from tetri.sim import plan

    picks = {}
    for workload in ("hphd", "lphd"):
        tiny = tool.Workload("tiny", f"--workload {workload}", (1, 2), ())
        for label, slo in tool.SLOS[1:]:  # the 25 ms SLO (the 50 ms search is the same code, twice the time)
            flags = ["--workload", workload, "--gpus", "3", "--model-preset", "llama3-8b", "--hardware", "h200",
                     "--seed", "0", "--slo", f"ttft=1,tpot={slo.tpot_s:g}", "--max-sims", str(tool.PLAN_MAX_SIMS),
                     *tool.PLAN_FLAGS.split()]
            search = plan.plan_search(plan.build_parser().parse_args(flags), plan.build_parser(), slo, [512],
                                      ["reserve-dynamic"])
            assert search.sims > 1
            best = search.best().candidate
            expected = (best.num_prefill, best.num_decode) if best.mode == "tetri" else None
            picks[workload, label] = tool.plan_start(tiny, slo, COMMON)
            assert picks[workload, label] == expected
            auto = tool.run_flags(tiny, "--rate 5", f"auto@{label}", 10, COMMON)
            split = tool.run_flags(tiny, "--rate 5", "disagg", 10, COMMON)  # the baselines keep the sweep's split
            assert split[split.index("--prefill"):split.index("--decode") + 2] == ["--prefill", "1", "--decode", "2"]
            if expected is None:  # colocated-chunked won: every worker starts mixed
                assert "--prefill" not in auto and "--decode" not in auto
            else:
                assert auto[auto.index("--prefill"):auto.index("--decode") + 2] == [
                    "--prefill", str(expected[0]), "--decode", str(expected[1])]
    assert picks["hphd", "25 ms"] is None and picks["lphd", "25 ms"] == (2, 1)  # both branches exercised

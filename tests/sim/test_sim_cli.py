"""tetri-sim and tetri-plan end to end on small workloads."""

from __future__ import annotations

import json
import shlex

import pytest

from tetri.bench.records import Slo
from tetri.bench.report import REPORT_KEYS, SLO_KEYS
from tetri.bench.workload import Request
from tetri.sim import cli, plan
from tetri.sim.costmodel import HARDWARE_PRESETS, MODEL_PRESETS, CostModel


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = cli.main(["--mode", "tetri", "--workload", "random", "--num-requests", "40", "--rate", "20",
                   "--gpus", "3", "--prefill", "1", "--decode", "2", "--slo", "ttft=1,tpot=0.05", "--seed", "3",
                   "--json", str(out), "--plot-dir", str(tmp_path / "plots"), "--check-invariants"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) == REPORT_KEYS | SLO_KEYS and report["completed"] == 40
    assert report["config"]["sim"]["mode"] == "tetri" and report["config"]["sim"]["num_prefill"] == 1
    assert report["config"]["rate"] == 20 and report["config"]["model_preset"] == "llama3-8b"
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 0
    assert "TTFT" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["colocated", "colocated-chunked", "disagg"])
def test_cli_other_modes_and_presets(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    rc = cli.main(["--mode", mode, "--workload", "lpld", "--num-requests", "30", "--rate", "10", "--gpus", "2",
                   "--model-preset", "opt-13b", "--hardware", "a100", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["config"]["hardware"] == "a100"


def test_cli_trace_replay_and_sweep(tmp_path, traces_dir):
    out = tmp_path / "sweep.json"
    rc = cli.main(["--mode", "colocated-chunked", "--trace", str(traces_dir / "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"),
                   "--num-requests", "40", "--gpus", "2", "--sweep-rates", "2,50", "--slo", "ttft=1,tpot=0.05",
                   "--json", str(out), "--plot-dir", str(tmp_path)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [e["rate"] for e in report["sweep"]] == [2.0, 50.0] and "max_rate_at_90" in report
    assert (tmp_path / "slo_attainment_vs_rate.png").exists()
    rc = cli.main(["--mode", "tetri", "--trace", str(traces_dir / "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"),
                   "--num-requests", "30", "--gpus", "2", "--time-scale", "5", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["config"]["time_scale"] == 5


def test_cli_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--mode", "tetri", "--workload", "random", "--sweep-rates", "1,2"])  # no --slo
    assert cli.main(["--mode", "tetri", "--workload", "random", "--gpus", "4", "--prefill", "3",
                     "--decode", "3"]) == 2
    assert "must equal" in capsys.readouterr().err


def test_cli_profile_then_calibrated_run(tmp_path, default_model_dir):
    calib = tmp_path / "calib.json"
    assert cli.main(["profile", "--out", str(calib), "--model", default_model_dir, "--chunk-sizes", "16", "64",
                     "--batch-sizes", "1", "4", "--contexts", "32", "--repeats", "1", "--trace-requests", "4"]) == 0
    data = json.loads(calib.read_text())
    assert data["fit"]["mean_abs_rel_error"] >= 0 and data["threads"] == 1
    out = tmp_path / "r.json"
    assert cli.main(["--mode", "colocated-chunked", "--workload", "random", "--num-requests", "10", "--rate", "5",
                     "--gpus", "1", "--calibration", str(calib), "--max-output-tokens", "16",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["hardware"] == "cpu" and report["config"]["model_preset"].startswith("calibrated:")
    assert report["completed"] == 10
    with pytest.raises(SystemExit):
        cli.main(["--mode", "tetri", "--workload", "random", "--calibration", str(calib), "--hardware", "h200"])


def test_candidate_commands():
    c = plan.Candidate("tetri", 1024, 2, 6, "reserve-static")
    assert c.serve_command(8) == ("tetri-serve --gpus 0-7 --prefill 2 --decode 6 --chunk-size 1024 "
                                  "--dispatch-policy tetri --decode-policy reserve-static --mode disagg")
    assert plan.Candidate("colocated-chunked", 512).serve_command(4) == \
        "tetri-serve --gpus 0-3 --chunk-size 512 --mode colocated"


def test_search_finds_a_rate_and_prunes():
    cost = CostModel(MODEL_PRESETS["llama3-8b"], HARDWARE_PRESETS["h200"])
    base = [Request(300, 100, i / 1.0) for i in range(400)]  # deterministic arrivals at rate 1
    search = plan.Search(base, cost, Slo(0.5, 0.05), gpus=2, budget_s=60, window_s=4.0, min_requests=50)
    plan.run_search(search, [512, 2048], ["reserve-dynamic", "greedy"])
    best = search.best()
    assert best is not None and best.max_rate > 1.0
    # The verdict at the best rate really holds, and twice that rate is too much.
    ev = plan.Evaluation(best.candidate, None)
    assert search.attainment(best.candidate, best.max_rate, ev) >= 0.9
    assert search.attainment(best.candidate, best.max_rate * plan.BISECT_RATIO * 2, ev) < 0.9
    assert any(e.pruned for e in search.results)
    doc = plan.to_json(search)
    assert doc["best"]["command"].startswith("tetri-serve --gpus 0-1")


def test_plan_cli_prints_a_valid_command(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan.main(["--workload", "random", "--slo", "ttft=1,tpot=0.05", "--gpus", "2", "--num-requests", "50",
                    "--max-requests", "300", "--window-s", "3", "--budget-s", "15", "--chunk-sizes", "512",
                    "--decode-policies", "reserve-dynamic", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    command = [line for line in printed.splitlines() if line.startswith("tetri-serve")][0]
    argv = shlex.split(command)
    assert argv[:3] == ["tetri-serve", "--gpus", "0-1"] and "--mode" in argv and "--chunk-size" in argv
    mode = argv[argv.index("--mode") + 1]
    assert mode in ("disagg", "colocated")
    if mode == "disagg":
        p, d = int(argv[argv.index("--prefill") + 1]), int(argv[argv.index("--decode") + 1])
        assert p + d == 2 and argv[argv.index("--dispatch-policy") + 1] == "tetri"
    doc = json.loads(out.read_text())
    assert doc["best"]["command"] == command and doc["simulations"] > 0


def test_plan_with_explicit_rates(capsys):
    rc = plan.main(["--workload", "random", "--slo", "ttft=1,tpot=0.05", "--gpus", "2", "--num-requests", "40",
                    "--max-requests", "200", "--rates", "1,4", "--budget-s", "20", "--chunk-sizes", "512",
                    "--decode-policies", "greedy"])
    assert rc == 0 and "tetri-serve" in capsys.readouterr().out


def test_plan_searches_once_per_declared_slo(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan.main(["--workload", "random", "--slo", "ttft=1,tpot=0.05", "--slo", "ttft=1,tpot=0.025", "--gpus", "2",
                    "--num-requests", "40", "--max-requests", "200", "--rates", "1,4", "--budget-s", "20",
                    "--chunk-sizes", "512", "--decode-policies", "greedy", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "== SLO ttft=1,tpot=0.05\n" in printed and "== SLO ttft=1,tpot=0.025\n" in printed
    doc = json.loads(out.read_text())
    assert [d["slo"]["tpot_s"] for d in doc["by_slo"]] == [0.05, 0.025]
    assert doc["slo"]["tpot_s"] == 0.05 and all(d["simulations"] > 0 for d in doc["by_slo"])

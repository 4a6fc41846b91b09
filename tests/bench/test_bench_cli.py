"""tetri-bench end to end through `main([...])` against the fake server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tetri.bench import workload as wl
from tetri.bench.cli import main
from tetri.bench.report import REPORT_KEYS, SLO_KEYS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(fake_server, tmp_path, *extra: str) -> dict:
    out = tmp_path / "out" / "report.json"
    rc = main(["--base-url", fake_server.url, "--json", str(out), "--seed", "3", "--no-progress", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_cli_rate_run_writes_json_and_plots(fake_server, tmp_path, capsys):
    report = run_cli(fake_server, tmp_path, "--workload", "random", "--num-requests", "12", "--rate", "100",
                     "--max-prompt-tokens", "40", "--max-output-tokens", "6", "--slo", "ttft=30,tpot=30",
                     "--plot-dir", str(tmp_path / "plots"))
    assert set(report) == REPORT_KEYS | SLO_KEYS
    assert report["completed"] == 12 and report["failed"] == 0
    assert report["mean_output_tokens"] == 6.0  # random lengths clipped to 6 tokens
    assert report["slo_attainment"] == 1.0
    cfg = report["config"]
    assert cfg["model"] == "fake"  # from GET /v1/models
    assert cfg["rate"] == 100.0 and cfg["workload"] == "random" and cfg["num_requests"] == 12
    assert cfg["slo"] == {"ttft_s": 30.0, "tpot_s": 30.0} and "api_key" not in cfg
    assert (tmp_path / "plots" / "latency_cdf.png").read_bytes()[:8] == PNG_MAGIC
    assert "TTFT" in capsys.readouterr().out
    assert len(fake_server.state.seen) == 12


def test_cli_sweep(fake_server, tmp_path):
    report = run_cli(fake_server, tmp_path, "--workload", "random", "--num-requests", "8",
                     "--max-prompt-tokens", "16", "--max-output-tokens", "4", "--slo", "ttft=30,tpot=30",
                     "--sweep-rates", "50,100", "--plot-dir", str(tmp_path / "plots"), "--model", "fake",
                     "--api-key", "secret")
    assert [e["rate"] for e in report["sweep"]] == [50.0, 100.0]
    assert all(e["slo_attainment"] == 1.0 and e["completed"] == 8 for e in report["sweep"])
    assert report["max_rate_at_90"] == 100.0
    assert report["config"]["rate"] == 100.0 and report["config"]["sweep_rates"] == [50.0, 100.0]
    assert (tmp_path / "plots" / "slo_attainment_vs_rate.png").read_bytes()[:8] == PNG_MAGIC
    assert "secret" not in json.dumps(report)


def test_cli_mooncake_trace_replay(fake_server, tmp_path, traces_dir):
    trace = traces_dir / "mooncake_fast25" / "synthetic_trace.jsonl"
    report = run_cli(fake_server, tmp_path, "--trace", str(trace), "--num-requests", "6", "--time-scale", "1000",
                     "--length-scale", "0.002", "--max-output-tokens", "5")
    assert report["completed"] == 6
    # first Mooncake prompt is 40,160 tokens -> round(40160 * 0.002) = 80
    assert fake_server.state.seen.count((80, 1)) == 1
    assert all(out <= 5 for _, out in fake_server.state.seen)


def test_cli_class_workload_closed_loop_chat(fake_server, tmp_path, traces_dir):
    report = run_cli(fake_server, tmp_path, "--workload", "lpld", "--num-requests", "8", "--concurrency", "3",
                     "--length-scale", "0.05", "--endpoint", "chat", "--trace-dir", str(traces_dir))
    assert report["completed"] == 8 and report["config"]["concurrency"] == 3
    assert report["mean_output_tokens"] <= 128 * 0.05 + 1
    assert fake_server.state.max_in_flight <= 3


def test_cli_failures_are_reported(fake_server, tmp_path):
    report = run_cli(fake_server, tmp_path, "--workload", "random", "--num-requests", "9", "--rate", "inf",
                     "--max-prompt-tokens", "16", "--max-output-tokens", "3", "--model", "flaky-3",
                     "--slo", "ttft=30,tpot=30")
    assert report["completed"] == 6 and report["failed"] == 3
    assert report["slo_attainment"] == pytest.approx(6 / 9)


def test_cli_multi_turn_chat_resends_each_turns_history(fake_server, tmp_path):
    """Each conversation's turns in order, each with the whole history: the answers the server
    gave (default) or the dataset's; one conversation at a time here, so the order is fixed."""
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps([{"instruction": f"question {i}", "output": f"dataset answer {i}"} for i in range(8)]))
    convs = wl.load_chat_conversations(path, 2, 3, seed=3)
    common = ("--chat-conversations", "2", "--chat-turns", "3", "--chat-dataset", str(path), "--concurrency", "1",
              "--max-output-tokens", "3")
    report = run_cli(fake_server, tmp_path, *common)
    assert report["completed"] == 6 and report["failed"] == 0 and report["mean_output_tokens"] == 3.0
    assert report["config"]["chat_history"] == "served" and report["config"]["endpoint"] == "chat"
    served = " t0 t1 t2"  # what the fake server answers to max_tokens=3
    bodies = fake_server.state.bodies
    assert [b["messages"] for b in bodies] == [wl.chat_messages(c, t, [served] * t) for c in convs for t in range(3)]
    assert all(b["max_tokens"] == 3 and b["temperature"] == 0.0 and b["stream"] for b in bodies)
    # prompt tokens are the server's count (the fake counts the last message's words)
    assert report["mean_prompt_tokens"] == 2.0

    report = run_cli(fake_server, tmp_path, *common, "--chat-history", "dataset")
    assert report["completed"] == 6 and report["config"]["chat_history"] == "dataset"
    assert [b["messages"] for b in bodies[6:]] == [wl.chat_messages(c, t) for c in convs for t in range(3)]
    assert bodies[8]["messages"][1] == {"role": "assistant", "content": convs[0][0].dataset_answer}

    # served history: a failed turn ends its conversation (the next turns would lack its answer)
    report = run_cli(fake_server, tmp_path, *common, "--model", "flaky-17")  # the 17th call: conv 1, turn 1
    assert report["completed"] == 4 and report["failed"] == 1


def test_cli_argument_errors(tmp_path, capsys):
    base = ["--base-url", "http://127.0.0.1:9", "--workload", "random"]
    for bad in (["--sweep-rates", "1,2"],  # needs --slo
                ["--sweep-rates", "1,2", "--slo", "ttft=1", "--concurrency", "2"],
                ["--rate", "1", "--concurrency", "2"],
                ["--slo", "bogus=1"],
                ["--rate", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(base + bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--base-url", "http://127.0.0.1:9"])  # neither --trace nor --workload
    with pytest.raises(SystemExit) as exc:  # a multi-turn chat has no arrival times
        main(["--base-url", "http://127.0.0.1:9", "--chat-conversations", "2", "--rate", "1"])
    assert exc.value.code == 2
    assert main(["--base-url", "http://127.0.0.1:9", "--trace", str(tmp_path / "missing.csv"),
                 "--model", "m", "--no-progress"]) == 2


def test_bench_imports_without_torch():
    code = ("import sys, tetri.bench.cli, tetri.bench.client, tetri.bench.report, tetri.bench.workload; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

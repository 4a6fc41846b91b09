"""Workload generation: real trace loaders (from ../shared), TetriInfer classes, arrivals, scaling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tetri.bench import workload as wl
from tetri.bench.workload import Request


@pytest.fixture(scope="module")
def pool(traces_dir):
    return wl.build_class_pool(traces_dir)


def test_azure_trace(traces_dir):
    reqs = wl.load_trace(traces_dir / wl.AZURE_CONV_RELPATH)
    assert len(reqs) == 19_366
    assert reqs[0] == Request(374, 44, 0.0)
    assert reqs[1].arrival_s == pytest.approx(50.9951690 - 46.6805900)
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] == pytest.approx(3501.72, abs=0.01)  # README: span 3,501.7 s
    assert reqs[-1].prompt_tokens == 197 and reqs[-1].output_tokens == 183
    assert min(min(r.prompt_tokens, r.output_tokens) for r in reqs) >= 1


def test_mooncake_trace(traces_dir):
    reqs = wl.load_trace(traces_dir / wl.MOONCAKE_RELPATH)
    assert len(reqs) == 3_993
    assert reqs[0] == Request(40160, 6, 0.0, tuple(range(79)))  # its prefix-block ids (512 tokens each)
    assert reqs[-1].arrival_s == pytest.approx(1022.025)
    assert np.mean([r.prompt_tokens for r in reqs]) == pytest.approx(15325.5, abs=0.1)


def test_length_stats_traces(traces_dir):
    expected_rows = {"sharegpt_8k_filtered_stats_llama2_tokenizer.csv": 30_731,
                     "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv": 28_257,
                     "bwb_stats_llama2_tokenizer_filtered_v2.csv": 33_768}
    for name, rows in expected_rows.items():
        reqs = wl.load_trace(traces_dir / "length_stats" / name)
        assert len(reqs) == rows
        assert all(r.arrival_s is None for r in reqs[:100])
    assert wl.load_trace(traces_dir / wl.SHAREGPT_RELPATH)[0] == Request(74, 918, None)


def test_resolve_trace_path(traces_dir):
    assert wl.resolve_trace_path(wl.MOONCAKE_RELPATH, traces_dir) == (traces_dir / wl.MOONCAKE_RELPATH).resolve()
    with pytest.raises(FileNotFoundError):
        wl.resolve_trace_path("no/such/trace.csv", traces_dir)


def test_classify_cutoffs():
    assert wl.classify(512, 128) == "lpld"
    assert wl.classify(512, 129) == "lphd"
    assert wl.classify(513, 128) == "hpld"
    assert wl.classify(513, 129) == "hphd"


def test_class_pool_partitions_both_traces(pool):
    assert sum(len(v) for v in pool.values()) == 19_366 + 30_731
    for name, rows in pool.items():
        assert len(rows) > 1000
        assert {wl.classify(int(p), int(o)) for p, o in rows} == {name}


@pytest.mark.parametrize("name", wl.CLASS_NAMES)
def test_class_workloads_respect_cutoffs(pool, name):
    reqs = wl.sample_workload(name, 300, np.random.default_rng(1), pool)
    assert len(reqs) == 300
    assert all(wl.classify(r.prompt_tokens, r.output_tokens) == name for r in reqs)
    assert len({(r.prompt_tokens, r.output_tokens) for r in reqs}) > 50  # really sampled


def test_mixed_is_balanced_and_seeded(pool):
    reqs = wl.sample_workload("mixed", 102, np.random.default_rng(7), pool)
    counts = {c: 0 for c in wl.CLASS_NAMES}
    for r in reqs:
        counts[wl.classify(r.prompt_tokens, r.output_tokens)] += 1
    assert sorted(counts.values()) == [25, 25, 26, 26]
    assert reqs == wl.sample_workload("mixed", 102, np.random.default_rng(7), pool)
    assert [wl.classify(r.prompt_tokens, r.output_tokens) for r in reqs[:12]] != sorted(
        wl.classify(r.prompt_tokens, r.output_tokens) for r in reqs[:12])  # shuffled, not blocks


def test_random_workload_bounds():
    reqs = wl.sample_workload("random", 500, np.random.default_rng(0), max_prompt_tokens=64,
                              max_output_tokens=8)
    assert all(16 <= r.prompt_tokens <= 64 and 1 <= r.output_tokens <= 8 for r in reqs)
    with pytest.raises(ValueError):
        wl.sample_workload("nope", 1, np.random.default_rng(0))


def test_length_scale_and_clipping():
    reqs = [Request(1000, 300, 1.5), Request(3, 1, None)]
    assert wl.scale_lengths(reqs, 0.1) == [Request(100, 30, 1.5), Request(1, 1, None)]
    assert wl.scale_lengths(reqs, 2.0, max_prompt_tokens=1500, max_output_tokens=100) == [
        Request(1500, 100, 1.5), Request(6, 2, None)]


def test_poisson_arrivals():
    arrivals = wl.poisson_arrivals_s(4000, 10.0, np.random.default_rng(3))
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert np.mean(np.diff(arrivals)) == pytest.approx(0.1, rel=0.1)
    assert arrivals == wl.poisson_arrivals_s(4000, 10.0, np.random.default_rng(3))
    assert wl.poisson_arrivals_s(3, float("inf"), np.random.default_rng(0)) == [0.0, 0.0, 0.0]


def test_build_workload_time_scale_and_duration(traces_dir):
    raw = wl.load_trace(traces_dir / wl.AZURE_CONV_RELPATH)[:50]
    reqs = wl.build_workload(trace=str(traces_dir / wl.AZURE_CONV_RELPATH), num_requests=50, time_scale=4.0,
                             length_scale=0.5)
    assert [r.arrival_s for r in reqs] == pytest.approx([r.arrival_s / 4.0 for r in raw])
    assert [r.prompt_tokens for r in reqs] == [max(1, round(r.prompt_tokens * 0.5)) for r in raw]
    timed = wl.build_workload(trace=str(traces_dir / wl.AZURE_CONV_RELPATH), num_requests=50)
    assert [r.arrival_s for r in timed] == pytest.approx([r.arrival_s for r in raw])  # default: own pace
    short = wl.build_workload(trace=str(traces_dir / wl.AZURE_CONV_RELPATH), num_requests=50, duration_s=3.0)
    assert short == [r for r in timed if r.arrival_s <= 3.0] and 0 < len(short) < 50


def test_build_workload_modes(traces_dir):
    sharegpt = str(traces_dir / wl.SHAREGPT_RELPATH)
    poisson = wl.build_workload(trace=sharegpt, num_requests=40, rate=5.0, seed=2)
    assert len(poisson) == 40 and poisson[0].arrival_s == 0.0
    assert poisson == wl.build_workload(trace=sharegpt, num_requests=40, rate=5.0, seed=2)
    closed = wl.build_workload(workload="hpld", num_requests=10, concurrency=2, traces_dir=traces_dir)
    assert all(r.arrival_s is None for r in closed)
    burst = wl.build_workload(trace=sharegpt, num_requests=5)  # untimed, no mode: all at once
    assert [r.arrival_s for r in burst] == [0.0] * 5
    with pytest.raises(ValueError, match="time-scale"):
        wl.build_workload(trace=sharegpt, num_requests=5, time_scale=2.0)
    with pytest.raises(ValueError):
        wl.build_workload(workload="random", trace=sharegpt)
    with pytest.raises(ValueError):
        wl.build_workload(workload="random", rate=1.0, concurrency=2)


# ---------------------------------------------------------------- multi-turn chat


def _records(n: int) -> list[dict]:
    return [{"instruction": f"question {i}?", "output": f"answer {i} " * 5, "dataset": "x", "generator": "y"}
            for i in range(n)]


def test_chat_conversations_take_consecutive_shuffled_records(tmp_path):
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(_records(10)))
    convs = wl.load_chat_conversations(path, num_conversations=3, turns=3, seed=1)
    assert [len(c) for c in convs] == [3, 3, 3]
    used = [t.instruction for c in convs for t in c]
    assert len(set(used)) == 9 and used != [f"question {i}?" for i in range(9)]  # shuffled, none twice
    for turn in (t for c in convs for t in c):
        i = int(turn.instruction.split()[1].rstrip("?"))
        assert turn.dataset_answer == f"answer {i} " * 5
    assert wl.load_chat_conversations(path, 3, 3, seed=1) == convs  # a pure function of the seed
    assert wl.load_chat_conversations(path, 3, 3, seed=2) != convs
    cut = wl.load_chat_conversations(path, 1, 2, seed=1, answer_chars=4)
    assert [t.dataset_answer for t in cut[0]] == [t.dataset_answer[:4] for t in convs[0][:2]]
    with pytest.raises(ValueError, match="fewer than 4 x 3"):
        wl.load_chat_conversations(path, 4, 3)


def test_chat_messages_carry_the_whole_history_with_either_answers():
    conv = [wl.ChatTurn("q0", "dataset a0"), wl.ChatTurn("q1", "dataset a1"), wl.ChatTurn("q2", "dataset a2")]
    assert wl.chat_messages(conv, 0) == wl.chat_messages(conv, 0, []) == [{"role": "user", "content": "q0"}]
    assert wl.chat_messages(conv, 2) == [
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "dataset a0"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "dataset a1"},
        {"role": "user", "content": "q2"}]
    served = wl.chat_messages(conv, 2, ["served a0", "served a1"])
    assert [m["content"] for m in served] == ["q0", "served a0", "q1", "served a1", "q2"]
    # each turn's messages extend the previous turn's: what makes its prefix cacheable
    assert served[:1] == wl.chat_messages(conv, 0, []) and served[:3] == wl.chat_messages(conv, 1, ["served a0"])
    with pytest.raises(ValueError, match="answers to 2 earlier turns"):
        wl.chat_messages(conv, 2, ["served a0"])
    with pytest.raises(ValueError, match="outside"):
        wl.chat_messages(conv, 3)


def test_chat_conversations_from_the_shared_alpaca_eval_file(datasets_dir):
    assert wl.default_datasets_dir() == datasets_dir.resolve()
    convs = wl.load_chat_conversations(num_conversations=4, turns=8)  # the default file, found there
    records = json.loads((datasets_dir / wl.CHAT_DATASET_RELPATH).read_text())
    by_instruction = {r["instruction"]: r["output"] for r in records}
    turns = [t for c in convs for t in c]
    assert len({t.instruction for t in turns}) == 32
    assert all(by_instruction[t.instruction] == t.dataset_answer for t in turns)

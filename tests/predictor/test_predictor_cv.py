"""The served model's own lengths (`generate`), K-fold held-back evaluation (`cv`), the joint
text + hidden-state predictor, and the simulator's measured-confusion predictor."""

import json
import random

import numpy as np
import pytest

from tetri.predictor.crossval import cross_validate, fold_of_prompts, load_length_records
from tetri.predictor.model import JointPredictor, load_predictor
from tetri.sched.load import ReqInfo
from tetri.predictor.registry import make_predictor
from tetri.sched.predictor import Prediction
from tetri.sched.predictor_cli import main


def _run(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_writes_the_log_lengths_format_with_the_engines_hidden_state(default_model_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": "say hi", "dataset": "a"}, {"instruction": "count to three please"},
                               {"instruction": "say hi", "dataset": "a"}]))
    out = tmp_path / "gen.jsonl"
    argv = ["generate", "--model", default_model_dir, "--out", str(out), "--prompts", str(src), "--max-tokens", "5",
            "--kv-cache-gb", "0.01", "--max-num-seqs", "4", "--batch", "1", "--resume"]
    assert _run(capsys, argv + ["--limit", "1"])["n"] == 1
    assert _run(capsys, argv)["n"] == 1  # resumed: only the prompt not yet answered
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["say hi", "count to three please"]
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    for r in rows:
        assert 1 <= r["output_tokens"] <= 5 and r["finish_reason"] in ("stop", "length")
        text = tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        assert r["prompt_tokens"] == len(ids) and r["prompt"] == tok.decode(ids, skip_special_tokens=True)
        with torch.no_grad():
            want = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        assert torch.allclose(torch.tensor(r["hidden"]), want, atol=1e-4)  # the final-norm state HF reports
    recs = load_length_records(out, need_hidden=True)
    assert recs.hidden.shape == (2, hf.config.hidden_size)


def _synthetic(path, n=240, seed=0):
    """Bucket (200 tokens) set partly by a prompt keyword and partly by a hidden direction."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            b = int(rng.integers(0, 3))
            word = ["brief", "explain", "essay"][b] if rng.random() < 0.6 else "thing"
            hidden = rng.normal(size=12) + 1.5 * np.eye(12)[b]
            f.write(json.dumps({"prompt": f"q{i} please {word} now", "output_tokens": b * 200 + int(rng.integers(0, 200)),
                                "hidden": hidden.tolist()}) + "\n")


def test_folds_are_by_prompt():
    prompts = [f"p{i % 7}" for i in range(30)]
    fold = fold_of_prompts(prompts, 3, seed=1)
    for p in set(prompts):
        assert len({f for q, f in zip(prompts, fold) if q == p}) == 1
    assert sorted(set(fold)) == [0, 1, 2] and fold == fold_of_prompts(prompts, 3, seed=1)
    with pytest.raises(ValueError):
        fold_of_prompts(prompts, 1, seed=0)


def test_cv_pools_held_back_folds_and_joint_beats_each_part(tmp_path):
    _synthetic(tmp_path / "d.jsonl")
    recs = load_length_records(tmp_path / "d.jsonl", need_hidden=True)
    kw = dict(folds=3, seed=0, text_epochs=10, probe_epochs=40, probe_weight_decay=1e-2)
    reports = {k: cross_validate(recs, k, **kw) for k in ("text", "hidden", "joint")}
    for r in reports.values():
        assert r["n"] == 240 and sum(map(sum, r["confusion"])) == 240 and len(r["per_fold"]) == 3
        assert r["label_counts"] == [sum(row) for row in r["confusion"]]
        assert r["accuracy"] == pytest.approx(sum(r["confusion"][b][b] for b in range(3)) / 240)
        assert 0.2 < r["majority_baseline"] < 0.5 and r["accuracy"] > r["majority_baseline"] + 0.15
    assert reports["joint"]["accuracy"] > max(reports["text"]["accuracy"], reports["hidden"]["accuracy"])


def test_joint_predictor_saves_loads_and_serves(tmp_path):
    from tetri.predictor.train import train_probe, train_text

    _synthetic(tmp_path / "d.jsonl", n=150)
    recs = load_length_records(tmp_path / "d.jsonl")
    joint = JointPredictor(train_text(recs.prompts, recs.lengths, epochs=5),
                           train_probe(recs.hidden, recs.lengths, epochs=20))
    joint.save(tmp_path / "j")
    loaded = make_predictor(f"model:{tmp_path / 'j'}")
    assert isinstance(loaded, JointPredictor) and loaded.kind == "joint"
    assert loaded.predict_buckets(recs.prompts[:20], recs.hidden[:20]) == joint.predict_buckets(recs.prompts[:20],
                                                                                                 recs.hidden[:20])
    req = ReqInfo("r", 10, 4096)
    both = loaded.predict(req, {"prompt": recs.prompts[0], "hidden": recs.hidden[0].tolist()})
    bucket = joint.predict_buckets(recs.prompts[:1], recs.hidden[:1])[0]
    assert both == Prediction(bucket, bucket * 200, bucket * 200 + 200)
    assert loaded.predict(req, {"prompt": recs.prompts[0]}) == loaded.text.predict(req, {"prompt": recs.prompts[0]})
    assert loaded.predict(req, {"hidden": recs.hidden[0].tolist()}).bucket == \
        load_predictor(tmp_path / "j" / "probe").predict_buckets_hidden(recs.hidden[:1])[0]


def test_sim_predictor_reproduces_a_measured_confusion():
    from tetri.sim.requests import NoisyPredictor

    confusion = ((8, 2, 0), (1, 6, 3), (0, 0, 0))
    pred = NoisyPredictor("oracle", random.Random(0), confusion=confusion)
    got = {0: [], 1: [], 2: []}
    for i in range(4000):
        true_tokens = (i % 3) * 200 + 50
        info = pred.annotate(ReqInfo(f"r{i}", 10, 4096), true_tokens)
        got[i % 3].append(info.predicted_low_tokens // 200)
    assert set(got[0]) == {0, 1} and abs(got[0].count(0) / len(got[0]) - 0.8) < 0.04
    assert set(got[1]) == {0, 1, 2} and abs(got[1].count(2) / len(got[1]) - 0.3) < 0.04
    assert set(got[2]) == {2}  # no measured row: the truth
    assert pred.misses == sum(1 for b, v in got.items() for x in v if x != b)


def test_cv_cli_and_study_tool_feed_the_simulator(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from tetri.sim.cli import main as sim_main

    data = tmp_path / "d.jsonl"
    _synthetic(data, n=90)
    report = _run(capsys, ["cv", "--data", str(data), "--features", "hidden", "--folds", "3", "--probe-epochs", "10"])
    assert report["kind"] == "hidden" and report["n"] == 90 and len(report["confusion"]) == 3
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("tetri_tools_predictor_study", root / "tools" / "predictor_study.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    conf = tmp_path / "conf.json"
    assert tool.main(["--data", str(data), "--bucket-tokens", "200", "--text-epochs", "1", "--probe-epochs", "3", "--folds", "2",
                      "--out", str(tmp_path / "s.json"), "--confusion-out", str(conf)]) == 0
    study = json.loads((tmp_path / "s.json").read_text())[0]
    assert (study["n_train"], study["n_test"]) == (72, 18) and set(study["test"]) == {"text", "hidden", "joint"}
    assert sum(map(sum, json.loads(conf.read_text())["confusion"])) == 90
    out = tmp_path / "sim.json"
    assert sim_main(["--mode", "tetri", "--workload", "random", "--num-requests", "60", "--rate", "20", "--gpus", "2",
                     "--predictor-confusion", str(conf), "--json", str(out)]) == 0
    sim = json.loads(out.read_text())["config"]["sim"]
    assert sim["predictions"] == 60 and sim["predictor_confusion"] == json.loads(conf.read_text())["confusion"]

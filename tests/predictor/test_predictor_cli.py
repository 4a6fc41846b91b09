"""The learned length predictor: CLI end to end, save/load, probe, model:DIR in sched."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tetri.predictor.data import eval_metrics, load_examples, split_prompts
from tetri.predictor.model import load_predictor
from tetri.predictor.train import train_probe
from tetri.sched.load import ReqInfo
from tetri.predictor.registry import make_predictor
from tetri.sched.predictor import Prediction
from tetri.sched.predictor_cli import main

KEYS = {"accuracy", "accuracy_within_one_bucket", "mae_tokens", "majority_baseline", "n"}
FILLER = "the a of cat dog river city data model plan green fast slow why how what".split()
KIND_TOKENS = {"briefly": 40, "explain": 300, "essay": 700}  # buckets 0, 1, 3 at 200/bucket


def _write_keyword_jsonl(path: Path, n: int, seed: int, use_response: bool) -> None:
    rng = random.Random(seed)
    kinds = ["briefly"] * 5 + ["explain"] * 3 + ["essay"] * 2
    with open(path, "w") as f:
        for i in range(n):
            kind = rng.choice(kinds)
            words = rng.sample(FILLER, 6) + [kind] + rng.sample(FILLER, 3)
            length = KIND_TOKENS[kind] + rng.randint(-30, 30)
            rec = {"prompt": f"{i}: " + " ".join(words)}
            if use_response:
                rec["response"] = " ".join(["word"] * length)
            else:
                rec["output_tokens"] = length
            f.write(json.dumps(rec) + "\n")


def _run(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def keyword_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kw")
    _write_keyword_jsonl(tmp / "train.jsonl", 300, seed=1, use_response=False)
    _write_keyword_jsonl(tmp / "test.jsonl", 100, seed=2, use_response=True)
    assert main(["train", "--data", str(tmp / "train.jsonl"), "--out", str(tmp / "model"),
                 "--bucket-tokens", "200", "--epochs", "10", "--seed", "3"]) == 0
    return tmp


def test_train_eval_end_to_end(keyword_model, capsys):
    capsys.readouterr()
    result = _run(capsys, ["eval", "--model", str(keyword_model / "model"), "--data", str(keyword_model / "test.jsonl")])
    assert set(result) == KEYS and result["n"] == 100
    assert result["accuracy"] >= result["majority_baseline"]
    assert result["accuracy"] >= 0.9 and result["accuracy_within_one_bucket"] >= result["accuracy"]
    meta = json.loads((keyword_model / "model" / "meta.json").read_text())
    assert meta["kind"] == "text" and meta["bucket_tokens"] == 200 and meta["majority_bucket"] == 0
    assert sum(meta["label_counts"].values()) == 300
    assert {p.name for p in (keyword_model / "model").iterdir()} == {"meta.json", "weights.safetensors"}


def test_saved_model_through_sched_interface(keyword_model):
    pred = make_predictor(f"model:{keyword_model / 'model'}")
    req = ReqInfo("r", 12, 4096)
    assert pred.predict(req) is None  # no prompt text given
    assert pred.predict(req, {"prompt": "please write an essay about the river city"}) == Prediction(3, 600, 800)
    assert pred.predict(req, {"prompt": "answer briefly: why the cat"}).bucket == 0


def test_training_is_deterministic(tmp_path, capsys):
    _write_keyword_jsonl(tmp_path / "d.jsonl", 80, seed=5, use_response=False)
    for out in ("m1", "m2"):
        main(["train", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / out), "--epochs", "3"])
    w1 = (tmp_path / "m1" / "weights.safetensors").read_bytes()
    w2 = (tmp_path / "m2" / "weights.safetensors").read_bytes()
    assert w1 == w2


def test_probe_train_save_load(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    centers = rng.normal(size=(3, 16)) * 3
    feats = centers[labels] + rng.normal(size=(300, 16))
    pred = train_probe(feats, labels, labels_are_buckets=True, epochs=30, seed=0, hidden_dim=8)
    pred.save(tmp_path / "probe")
    loaded = load_predictor(tmp_path / "probe")
    assert json.loads((tmp_path / "probe" / "meta.json").read_text())["kind"] == "probe"
    got = loaded.predict_buckets_hidden(feats)
    assert np.mean(np.array(got) == labels) > 0.9
    assert loaded.predict_from_hidden(feats[0]).bucket == got[0]
    assert loaded.predict(ReqInfo("r", 1, 10), {"hidden": feats[1].tolist()}).bucket == got[1]
    by_tokens = train_probe(feats, labels * 200 + 50, bucket_tokens=200, epochs=5)
    assert by_tokens.meta["label_counts"] == {str(b): int((labels == b).sum()) for b in range(3)}


def test_metrics_and_split():
    m = eval_metrics([0, 1, 3], [10, 450, 700], 200, 4, majority_bucket=0)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["accuracy_within_one_bucket"] == 1.0
    assert m["mae_tokens"] == pytest.approx((90 + 150 + 0) / 3) and m["majority_baseline"] == pytest.approx(1 / 3)
    train = split_prompts([f"p{i}" for i in range(50)] * 2, 0.8, seed=3)
    assert len(train) == 40 and train == split_prompts([f"p{i}" for i in range(50)], 0.8, seed=3)


# The shared data lives beside the checkout (../shared relative to the repo root, as for the
# bench tests' traces), never inside it.
SHARED_DIR = Path(__file__).resolve().parents[2].parent / "shared"
ALPACA = SHARED_DIR / "datasets" / "alpaca_eval" / "model_outputs" / "Meta-Llama-3-8B-Instruct.json"


@pytest.mark.skipif(not ALPACA.exists(), reason="AlpacaEval data not present")
def test_alpaca_prepare_split_by_prompt_and_small_train(tmp_path, capsys):
    tr, te = tmp_path / "tr.jsonl", tmp_path / "te.jsonl"
    counts = _run(capsys, ["prepare-alpaca", "--out-train", str(tr), "--out-test", str(te), "--src", str(ALPACA.parent),
                           "--models", "Meta-Llama-3-8B-Instruct", "Mistral-7B-Instruct-v0.2", "--seed", "0"])
    assert counts == {"train": 1288, "test": 322}
    train_prompts = set(load_examples(tr).prompts)
    test = load_examples(te)
    assert not train_prompts & set(test.prompts) and test.length_unit == "words"
    _run(capsys, ["train", "--data", str(tr), "--out", str(tmp_path / "m"), "--epochs", "2"])
    result = _run(capsys, ["eval", "--model", str(tmp_path / "m"), "--data", str(te)])
    assert set(result) == KEYS and result["n"] == 322 and 0.0 <= result["accuracy"] <= 1.0

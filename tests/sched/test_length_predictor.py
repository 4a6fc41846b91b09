"""The pure predictor interface: buckets, none/oracle predictors, spec parsing."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tetri.sched.load import ReqInfo
from tetri.predictor.registry import make_predictor
from tetri.sched.predictor import (NonePredictor, OraclePredictor, Prediction, bucket_of, prediction_for_bucket,
                                   with_prediction)

REQ = ReqInfo("r1", prompt_tokens=50, max_tokens=1000)


@given(st.integers(0, 10**6), st.integers(1, 1000))
def test_bucket_of_contains_length(tokens, width):
    b = bucket_of(tokens, width)
    pred = prediction_for_bucket(b, width)
    assert pred.low_tokens <= tokens < pred.high_tokens


def test_bucket_examples():
    assert [bucket_of(t, 200) for t in (0, 199, 200, 399, 400)] == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError):
        bucket_of(5, 0)


def test_none_and_oracle():
    assert make_predictor("none").predict(REQ) is None
    assert isinstance(make_predictor("none"), NonePredictor)
    oracle = make_predictor("oracle", bucket_tokens=100)
    assert isinstance(oracle, OraclePredictor)
    assert oracle.predict(REQ) is None
    assert oracle.predict(REQ, {"expected_output_tokens": 250}) == Prediction(2, 200, 300)
    oracle.set_length("r1", 99)
    assert oracle.predict(REQ) == Prediction(0, 0, 100)
    capped = ReqInfo("r2", 50, max_tokens=120)
    assert oracle.predict(capped, {"expected_output_tokens": 5000}) == Prediction(1, 100, 200)

    class WithAttr:  # e.g. an EngineRequest-like object carrying the true length
        req_id, max_tokens, expected_output_tokens = "x", 4096, 1234

    assert oracle.predict(WithAttr()) == Prediction(12, 1200, 1300)


def test_with_prediction_fills_range():
    req = with_prediction(REQ, Prediction(1, 200, 400))
    assert (req.predicted_low_tokens, req.predicted_high_tokens) == (200, 400)
    assert with_prediction(REQ, None) is REQ


def test_bad_specs():
    for spec in ("", "model:", "bert", "oracle:3"):
        with pytest.raises(ValueError):
            make_predictor(spec)

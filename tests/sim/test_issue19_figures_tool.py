"""tools/issue19_figures.py: the target verdicts and the section it writes (no simulation here)."""

from tests.tools import load_tool


def _tool():
    return load_tool("issue19_figures")


def test_verdict_judges_both_targets_and_says_by_how_much():
    v = _tool().verdict
    assert v(0.80, 0.90, 0.40) == "acc 2.00x majority (met); within-1 met"
    assert v(0.485, 0.856, 0.392) == "acc 1.24x majority (2x = 0.784; short by 0.299); within-1 met"
    assert v(0.60, 0.69, 0.55) == "acc 1.09x majority (2x = 1.100 > 1: unreachable); within-1 short by 0.010"


def _report(acc, within, maj, maj_within):
    return {"accuracy": acc, "accuracy_within_one_bucket": within, "majority_baseline": maj,
            "majority_within_one": maj_within, "label_counts": [3, 1]}


def test_study_table_uses_the_held_back_majority_of_its_own_width():
    tool = _tool()
    res = {"bucket_tokens": 100, "n_train": 8, "n_test": 2, "folds": 5,
           "test": {k: _report(0.5, 1.0, 0.25, 0.5) for k in ("text", "hidden", "joint")},
           "cv_all": {k: _report(0.4, 0.9, 0.3, 0.6) for k in ("text", "hidden", "joint")}}
    lines = tool.render_study("s", [res], "python x")
    assert "| majority bucket | 0.250 | 0.500 | 0.300 | 0.600 | |" in lines
    assert sum("acc 2.00x majority (met); within-1 met" in line for line in lines) == 3
    assert lines[-3:] == ["python x", "```", ""]

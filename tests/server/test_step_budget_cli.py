"""tetri-serve's --step-budget: the SLO step budget is --mode auto's default (at --slo-tpot),
an opt-in elsewhere; the worker's sched config carries it."""

from tetri.cli import build_parser, resolve_mode, step_budget_fields
from tetri.config import EngineSchedConfig


def fields(*argv):
    args = build_parser().parse_args(list(argv))
    args.mode = resolve_mode(args)
    return step_budget_fields(args)


def test_auto_sizes_mixed_steps_to_its_slo_and_other_modes_keep_the_chunk():
    assert fields("--mode", "auto", "--slo-tpot", "0.025") == {"step_budget": "slo", "step_tpot_s": 0.025}
    assert fields("--gpus", "0-3") == {"step_budget": "slo", "step_tpot_s": 0.05}  # auto by default on 2+ GPUs
    assert fields("--mode", "colocated") == {"step_budget": "fixed", "step_tpot_s": None}
    assert fields() == {"step_budget": "fixed", "step_tpot_s": None}
    assert fields("--mode", "colocated", "--step-budget", "slo", "--slo-tpot", "0.04") == \
        {"step_budget": "slo", "step_tpot_s": 0.04}
    assert fields("--mode", "auto", "--step-budget", "fixed") == {"step_budget": "fixed", "step_tpot_s": None}


def test_the_memory_profile_sizes_the_largest_step_the_budget_may_take():
    assert EngineSchedConfig(chunk_size=512).max_step_prompt_tokens == 512
    assert EngineSchedConfig(chunk_size=512, step_budget="slo", step_tpot_s=0.05).max_step_prompt_tokens == 4096
    assert EngineSchedConfig(chunk_size=512, step_budget="slo").max_step_prompt_tokens == 512  # no SLO: fixed

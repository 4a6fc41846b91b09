"""tools/sim_bounds.py: the attainment split and the TTFT floor it reports for issue 19."""

import importlib.util
import sys
from pathlib import Path

from tetri.bench.records import RequestRecord

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location("tetri_tools_sim_bounds", ROOT / "tools" / "sim_bounds.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _record(ttft_s, tpot_s, ok=True):
    # 11 tokens: TPOT is (e2e - ttft) / 10
    return RequestRecord(prompt_tokens=10, output_tokens=11, ok=ok, ttft_s=ttft_s, e2e_s=ttft_s + 10 * tpot_s)


def test_attainment_splits_the_two_halves_of_the_slo():
    tool = _tool()
    records = [_record(0.5, 0.010), _record(2.0, 0.010), _record(0.5, 0.040), _record(2.0, 0.040),
               _record(0.1, 0.010, ok=False)]
    a = tool.attainment(records)
    assert a["ttft"] == 2 / 5 and a["tpot"] == 2 / 5 and a["both"] == 1 / 5


def test_the_floor_is_below_every_mode_at_an_idle_load():
    tool = _tool()
    means = tool.idle_ttfts(24, ("mixed", "--workload mixed --rate 2"),
                            "--gpus 8 --model-preset llama3-8b --hardware h200 --seed 0 --chunk-size 512")
    assert set(means) == {"floor", *(m for m, _ in tool.IDLE_MODES)}
    for mode, mean_s in means.items():
        assert means["floor"] <= mean_s + 1e-9, mode  # no schedule prefills faster than the prompt alone
    assert means["floor"] > 0.01  # 8B prompts of ~1400 tokens are tens of ms on one H200

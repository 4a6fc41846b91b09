"""The SLO step budget on the real model (CPU): it changes how prompts are packed into steps,
never the tokens. Greedy output with the SLO budget equals the fixed-chunk engine's and Hugging
Face's, and with a TPOT SLO the measured steps leave room for, the core packed steps larger
than chunk_size (the fixed core never does)."""

import random

from tests.engine.tiny_models import VOCAB, build, hf_greedy_each
from tetri import LLM, SamplingParams

CHUNK = 16
LENGTHS = [5, 40, 90, 130]
NEW_TOKENS = 8


def test_slo_budget_packs_larger_steps_and_keeps_greedy_exact(tmp_path):
    d = build("llama", tmp_path / "m")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    expected = hf_greedy_each(d, prompts, NEW_TOKENS)
    fixed = LLM(str(d), chunk_size=CHUNK)
    fixed_out = [o.token_ids for o in fixed.generate(prompts, params)]
    assert fixed.core.largest_prompt_step <= CHUNK
    fixed.close()
    # a 5 s TPOT: tiny-model CPU steps of a few ms fit many chunks (up to the cap, 8 x CHUNK)
    slo = LLM(str(d), chunk_size=CHUNK, check_invariants=True, step_budget="slo", step_tpot_s=5.0)
    slo_out = [o.token_ids for o in slo.generate(prompts, params)]
    assert slo_out == fixed_out == expected
    assert slo.core.step_budget.samples > 0
    assert CHUNK < slo.core.largest_prompt_step <= 8 * CHUNK
    assert slo.executor.blocks.num_free == slo.executor.blocks.num_blocks
    slo.close()

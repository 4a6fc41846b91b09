"""`fit_error`: the front's refusal, from the board rows, of what no live pool can hold."""

from tetri.sched.load import WorkerLoad, fit_error


def _row(wid, role, total, state="ready", block_size=16):
    return WorkerLoad(worker_id=wid, role=role, state=state, total_blocks=total, free_blocks=total,
                      block_size=block_size)


def test_a_prompt_larger_than_every_prefill_pool_is_refused():
    loads = [_row(0, "prefill", 10), _row(1, "prefill", 20), _row(2, "decode", 100)]
    assert fit_error(320, 1, loads) is None  # 20 blocks: the larger prefill pool holds it
    why = fit_error(321, 1, loads)
    assert why is not None and "21 KV blocks" in why and "prefill" in why and "holds 20" in why


def test_every_choice_needs_its_own_blocks_on_decode_and_mixed_pools():
    disagg = [_row(0, "prefill", 100), _row(1, "decode", 12)]
    assert fit_error(63, 3, disagg) is None  # 64 tokens: 4 blocks x 3
    why = fit_error(64, 3, disagg)  # 65 tokens: 5 blocks x 3 = 15 > 12
    assert "15 KV blocks" in why and "n=3" in why and "decode" in why
    assert fit_error(64, 3, [_row(0, "mixed", 15)]) is None
    assert "mixed" in fit_error(64, 3, [_row(0, "mixed", 14)])


def test_only_live_pools_count_and_a_role_without_any_is_not_judged():
    loads = [_row(0, "prefill", 100), _row(1, "decode", 10), _row(2, "decode", 100, state="dead")]
    assert "decode" in fit_error(500, 1, loads)  # the big pool is dead
    assert fit_error(500, 1, [_row(0, "prefill", 100), _row(1, "decode", 100, state="dead")]) is None

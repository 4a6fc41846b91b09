"""DecodeStage: staged decode K/V always equals the paged pool's, whatever joins, leaves,
grows or is preempted between steps (the engine-level check is the HF parity suite, which
decodes through the stage)."""

from __future__ import annotations

import random

import pytest
import torch

from tetri.workers.decode_stage import DecodeStage

BLOCKS, LAYERS, BS, HEADS, DIM = 96, 2, 4, 2, 3


def _pool_tokens(pool: torch.Tensor, table: list[int], tokens: int) -> torch.Tensor:
    """`[layers, 2, heads, tokens, dim]` of a sequence (a slot's layout), read from the pool
    block by block."""
    rows = [pool[b] for b in table]  # each [layers, 2, bs, heads, dim]
    seq = torch.cat(rows, dim=2).transpose(2, 3)
    return seq[:, :, :, :tokens]


def _write_token(pool, stage, table, pos, slot) -> None:
    """What one decode step does for one sequence: new K/V into the pool and into its slot."""
    value = torch.randn(LAYERS, 2, HEADS, DIM)
    pool[table[pos // BS], :, :, pos % BS] = value
    stage.kv[slot, :, :, :, pos] = value


@pytest.mark.parametrize("seed", range(6))
def test_stage_matches_the_pool_through_joins_leaves_growth_and_preemption(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = torch.randn(BLOCKS, LAYERS, 2, BS, HEADS, DIM)
    stage = DecodeStage(pool, BS, budget_bytes=1e9)
    free = list(range(BLOCKS))
    rng.shuffle(free)
    seqs: dict[int, dict] = {}  # uid -> {"table", "len"}
    next_uid = 0
    regathers = 0
    for _step in range(120):
        if len(seqs) < 6 and rng.random() < 0.5:  # a prefilled sequence joins
            n = rng.randint(1, 14)
            need = -(-(n + 1) // BS)
            if need <= len(free):
                seqs[next_uid] = {"table": [free.pop() for _ in range(need)], "len": n}
                next_uid += 1
        if seqs and rng.random() < 0.15:  # one finishes
            gone = seqs.pop(rng.choice(list(seqs)))
            free.extend(gone["table"])
        if seqs and rng.random() < 0.1:  # preempted and recomputed: new uid, new blocks, new KV
            uid = rng.choice(list(seqs))
            s = seqs.pop(uid)
            free.extend(s["table"])
            rng.shuffle(free)
            s["table"] = [free.pop() for _ in range(len(s["table"]))]
            for b in s["table"]:
                pool[b] = torch.randn(LAYERS, 2, BS, HEADS, DIM)
            seqs[next_uid] = s
            next_uid += 1
        decoding = [u for u in seqs if rng.random() < 0.9]  # some skip a step
        if not decoding:
            continue
        for u in decoding:  # room for the new token
            s = seqs[u]
            if s["len"] + 1 > len(s["table"]) * BS:
                if not free:
                    decoding.remove(u)
                    continue
                s["table"].append(free.pop())
        if not decoding:
            continue
        ctx = [seqs[u]["len"] + 1 for u in decoding]
        before = list(stage.owner)
        slots = stage.plan(decoding, ctx, [seqs[u]["table"] for u in decoding])
        assert slots is not None and sorted(slots) == list(range(len(decoding)))
        regathers += sum(u not in before for u in decoding)
        for u, c, slot in zip(decoding, ctx, slots):
            _write_token(pool, stage, seqs[u]["table"], c - 1, slot)
            seqs[u]["len"] = c
        for u, c, slot in zip(decoding, ctx, slots):
            assert torch.equal(stage.kv[slot, :, :, :, :c], _pool_tokens(pool, seqs[u]["table"], c)), (u, slot)
    assert stage.capacity >= 16 and regathers < 120  # it grew, and mostly appended


def test_stage_declines_past_its_budget_and_recovers():
    pool = torch.randn(BLOCKS, LAYERS, 2, BS, HEADS, DIM)
    per_token = LAYERS * 2 * HEADS * DIM * 4
    stage = DecodeStage(pool, BS, budget_bytes=4 * 8 * per_token)  # 4 slots of 8 tokens
    tables = [[4 * i, 4 * i + 1, 4 * i + 2] for i in range(6)]
    assert stage.plan([0, 1, 2, 3, 4], [5] * 5, tables[:5]) is None  # 5 slots do not fit
    assert stage.plan([0, 1, 2], [9, 9, 9], tables[:3]) is None  # 3 slots of 12 tokens do not fit
    slots = stage.plan([0, 1, 2], [6, 6, 6], tables[:3])
    assert sorted(slots) == [0, 1, 2]
    for uid, slot in zip([0, 1, 2], slots):
        assert torch.equal(stage.kv[slot, :, :, :, :5], _pool_tokens(pool, tables[uid], 5))


def test_a_failed_step_forgets_every_slot():
    pool = torch.randn(BLOCKS, LAYERS, 2, BS, HEADS, DIM)
    stage = DecodeStage(pool, BS, budget_bytes=1e9)
    stage.plan([7], [3], [[0]])
    stage.reset()
    pool[0] = 0.0  # the pool changed while the stage was not told: a reset regathers
    stage.plan([7], [4], [[0, 1]])
    assert torch.equal(stage.kv[0, :, :, :, :3], _pool_tokens(pool, [0, 1], 3))


def test_more_slots_keep_the_staged_ones_and_the_budget_trims_capacity():
    pool = torch.randn(BLOCKS, LAYERS, 2, BS, HEADS, DIM)
    per_token = LAYERS * 2 * HEADS * DIM * 4
    stage = DecodeStage(pool, BS, budget_bytes=6 * 8 * per_token)
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(8)]
    stage.plan([0], [5], tables[:1])  # capacity 8 (a power of two), one slot
    stage.kv[0, :, :, :, 4] = 7.0  # as if the step wrote its token
    assert stage.capacity == 8
    stage.plan([0, 1], [6, 5], tables[:2])  # a second slot: the first one is kept, not regathered
    assert stage.owner[0] == 0 and bool((stage.kv[0, :, :, :, 4] == 7.0).all())
    slots = stage.plan([0, 1, 2, 3, 4, 5], [7, 6, 5, 5, 5, 5], tables[:6])  # 6 x 8 tokens: the whole budget
    assert sorted(slots) == list(range(6)) and stage.kv.shape[0] == 6
    assert stage.plan([0, 1, 2, 3, 4, 5, 6], [8] * 7, tables[:7]) is None  # 7 x 8 does not fit
    assert stage.capacity == 0 and stage.kv.shape[0] == 0

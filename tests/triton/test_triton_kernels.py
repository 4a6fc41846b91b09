"""The Triton kernels against plain SDPA over the same paged pool: every head dim (64, 80, 96,
128, 256) in every dtype, GQA ratios 1 to 8, lengths that end inside and at block
boundaries, shuffled block ids with holes, 1 to 64 sequences. Under the interpreter on CPU
here; on the GPU in tools/gpu_check.sh."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from tests.triton.conftest import DEVICE
from tests.triton.reference import TOL, PagedCase, ref_decode, ref_extend

pytestmark = pytest.mark.triton
pytest.importorskip("triton")
from tetri.workers import triton_attn as ta  # noqa: E402  (after the conftest set TRITON_INTERPRET)

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Every head dim in every dtype; the GQA ratios 1..8 cycle through those 15 cases.
CASES = [(hd, dt, 1 + i % 8) for i, (hd, dt) in enumerate(itertools.product(HEAD_DIMS, DTYPES))]


def _ids(case):
    hd, dt, group = case
    return f"d{hd}-{str(dt).removeprefix('torch.')}-g{group}"


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"max error {err}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]).cpu()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_decode_matches_sdpa(case):
    head_dim, dtype, group = case
    page = 16
    lengths = [1, page - 1, page, page + 1, 2 * page, 37]
    kv_heads = 2 if group <= 4 else 1
    c = PagedCase(lengths, page, kv_heads, head_dim, dtype, DEVICE, seed=head_dim + group)
    q = c.rand(len(lengths), kv_heads * group, head_dim).to(DEVICE)
    out = torch.empty_like(q)
    splits = 1 + group % 4
    ctx = torch.tensor(lengths, device=DEVICE)
    ta.decode_attention(q, c.pool, 1, c.table_tensor(), ctx, head_dim ** -0.5, out, splits, min_split_tokens=8)
    _close(out, ref_decode(c, q, 1, lengths, head_dim ** -0.5), dtype)


@pytest.mark.parametrize("batch, page, splits", [(1, 16, 4), (64, 16, 1), (13, 4, 3), (9, 32, 2)])
def test_decode_batches_pages_and_splits(batch, page, splits):
    rng = random.Random(batch)
    lengths = [rng.randint(1, 70) for _ in range(batch)] if batch > 1 else [300]
    kv_heads = 1 if batch > 16 else 2
    c = PagedCase(lengths, page, kv_heads, 64, torch.float16, DEVICE, seed=batch)
    q = c.rand(batch, 2 * kv_heads, 64).to(DEVICE)
    out = torch.empty_like(q)
    ta.decode_attention(q, c.pool, 0, c.table_tensor(), torch.tensor(lengths, device=DEVICE), 0.125, out, splits,
                        min_split_tokens=16)
    _close(out, ref_decode(c, q, 0, lengths, 0.125), torch.float16)


def test_decode_row_of_length_zero_is_zero_not_nan():
    """A CUDA-graph padding row: length 0, its table pointing at blocks of NaN."""
    c = PagedCase([5, 3], 16, 2, 64, torch.float32, DEVICE)
    c.pool[c.tables[1][0]] = float("nan")
    q = c.rand(2, 4, 64).to(DEVICE)
    out = torch.full_like(q, 7.0)
    ta.decode_attention(q, c.pool, 0, c.table_tensor(), torch.tensor([5, 0], device=DEVICE), 0.125, out, 2, 4)
    assert torch.equal(out[1].cpu(), torch.zeros(4, 64))
    _close(out[:1], ref_decode(c, q[:1], 0, [5], 0.125), torch.float32)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_extend_matches_causal_sdpa(case):
    """Several pieces in one call, after 3 decode rows: uncached, over a cached prefix, one
    token, ending at a block boundary (and, once the group takes rows, longer than one
    query block)."""
    head_dim, dtype, group = case
    page = 16
    pieces = [(0, 5), (7, 40), (48, 1), (16, 16)]  # (start position, rows)
    c = PagedCase([s + n for s, n in pieces], page, 1, head_dim, dtype, DEVICE, seed=head_dim * group)
    rows = [3]
    for _, n in pieces:
        rows.append(rows[-1] + n)
    heads = group
    q = c.rand(rows[-1] + 2, heads, head_dim).to(DEVICE)
    out = torch.full_like(q, 7.0)
    cu = torch.tensor(rows, device=DEVICE)
    starts = torch.tensor([s for s, _ in pieces], device=DEVICE)
    ta.extend_attention(q, c.pool, 1, c.table_tensor(), cu, starts, max(n for _, n in pieces), head_dim ** -0.5, out)
    spans = [(rows[i], n, s) for i, (s, n) in enumerate(pieces)]
    ref = ref_extend(c, q, 1, spans, head_dim ** -0.5)
    _close(out[3:rows[-1]], ref[3:rows[-1]], dtype)
    assert (out[:3] == 7).all() and (out[rows[-1]:] == 7).all()  # rows of no piece are not written


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_the_slots_and_skips_minus_one(dtype):
    c = PagedCase([20, 9], 8, 2, 80, dtype, DEVICE)
    t = 6
    k, v = c.rand(t, 2, 80).to(DEVICE), c.rand(t, 2, 80).to(DEVICE)
    targets = [(c.tables[0][2], 3), (c.tables[0][2], 4), None, (c.tables[1][1], 0), None, (c.tables[1][0], 7)]
    slots = torch.tensor([b * 8 + o if b is not None else -1 for b, o in (x or (None, 0) for x in targets)],
                         device=DEVICE)
    expected = c.pool.clone()
    for i, target in enumerate(targets):
        if target is not None:
            expected[target[0], 1, 0, target[1]] = k[i]
            expected[target[0], 1, 1, target[1]] = v[i]
    ta.store_kv(c.pool, 1, k, v, slots)
    assert torch.equal(_bits(c.pool), _bits(expected))  # bitwise: NaN blocks stay untouched too

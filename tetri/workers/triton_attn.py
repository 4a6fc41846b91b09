"""Triton kernels over the block-major KV pool, read in place through block tables.

    pool: [num_blocks, num_layers, 2 (k|v), page, kv_heads, head_dim]
    token t of a sequence lives in block table[t // page] at offset t % page

- `store_kv`: writes a step's new K/V rows at their slots (block * page + offset); a slot of
  -1 is skipped (the padding rows of a CUDA-graph step).
- `decode_attention`: one query token per row, split-KV (after SGLang/LightLLM): stage 1 runs
  one program per (row, kv head, split) over its share of the context, holding all the query
  heads of that kv head (`tl.dot` over the group padded to 16 rows when the group is 2 or
  more, a vector reduction for plain multi-head attention) and writes a partial output and
  its log-sum-exp; stage 2 merges the splits (with one split, stage 1 writes the output). The grid is static (`num_splits` is chosen from
  the batch size, never from the lengths), each row takes `min(num_splits, ceil(len /
  min_split_tokens))` splits on the device, so it can be captured in a CUDA graph.
- `extend_attention`: the queries of several prefill pieces (varlen: `cu_rows`), each against
  its sequence's whole context in the pool (the cached prefix plus its own new keys, which
  `store_kv` wrote first), causal; one program per (query block, piece, kv head) holds the
  query heads of that kv head as extra rows, so each K/V tile is read once per group.

Head dims that are not powers of two (80, 96) are padded to the next one and masked. fp16 and
bf16 inputs accumulate in fp32; fp32 inputs use IEEE fp32 dots (no TF32). Under
`TRITON_INTERPRET=1` (set before triton is imported) the same kernels run on CPU tensors: the
tests do that. The interpreter's `tl.dot` mishandles bf16 operands, so there (only) bf16
operands are widened to fp32 first, which computes the same products (bf16 x bf16 is exact in
fp32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the kernels below were decorated for the interpreter (fixed at import)."""


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, num_tokens, layer_off,
                     stride_kt, stride_vt, stride_block, stride_kv, stride_tok,
                     ROW: tl.constexpr, BLOCK_ROW: tl.constexpr, BLOCK_T: tl.constexpr, PAGE: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + offs_t, mask=offs_t < num_tokens, other=-1).to(tl.int64)
    keep = slot >= 0
    slot = tl.where(keep, slot, 0)
    offs = tl.arange(0, BLOCK_ROW)
    mask = keep[:, None] & (offs < ROW)[None, :]
    dst = (slot // PAGE) * stride_block + layer_off + (slot % PAGE) * stride_tok
    k = tl.load(k_ptr + offs_t[:, None] * stride_kt + offs[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + offs_t[:, None] * stride_vt + offs[None, :], mask=mask, other=0.0)
    tl.store(kv_ptr + dst[:, None] + offs[None, :], k, mask=mask)
    tl.store(kv_ptr + stride_kv + dst[:, None] + offs[None, :], v, mask=mask)


@triton.jit
def _decode_split_kernel(q_ptr, kv_ptr, tables_ptr, ctx_ptr, mid_o_ptr, mid_lse_ptr, out_ptr, layer_off, qk_scale,
                         stride_qt, stride_qh, stride_ot, stride_oh, stride_block, stride_kv, stride_tok, stride_head, stride_table,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                         DOT_F32: tl.constexpr, PREC: tl.constexpr):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    ctx = tl.load(ctx_ptr + row).to(tl.int32)
    if NUM_SPLITS == 1:
        start = 0
        end = ctx
    else:
        splits = tl.minimum(tl.maximum((ctx + MIN_SPLIT - 1) // MIN_SPLIT, 1), NUM_SPLITS)
        per_split = ((ctx + splits - 1) // splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, ctx)
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    base = kv_ptr + layer_off + kvh * stride_head
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block = tl.load(tables_ptr + row * stride_table + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        tok = block * stride_block + (offs_n % PAGE) * stride_tok
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(base + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + stride_kv + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if USE_DOT:
            if DOT_F32:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        else:
            qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_DOT:
            p = p.to(v.dtype)
            if DOT_F32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            pv = tl.dot(p, v, input_precision=PREC)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    has = l_i > 0
    safe_l = tl.where(has, l_i, 1.0)
    if NUM_SPLITS == 1:  # no merge: the normalized output is final (0 for an empty row)
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / safe_l[:, None]).to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    else:
        lse = tl.where(has, m_i + tl.log2(safe_l), float("-inf"))
        mid = (row * num_q_heads + heads) * NUM_SPLITS + split
        tl.store(mid_o_ptr + mid[:, None] * BLOCK_D + offs_d[None, :], acc / safe_l[:, None], mask=mask_h[:, None])
        tl.store(mid_lse_ptr + mid, lse, mask=mask_h)


@triton.jit
def _decode_merge_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    mid = (row * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
    lse = tl.load(mid_lse_ptr + mid, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (a padding row): output 0
    w = tl.exp2(lse - m)
    o = tl.load(mid_o_ptr + mid[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    den = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def _extend_kernel(q_ptr, kv_ptr, out_ptr, tables_ptr, cu_ptr, start_ptr, layer_off, qk_scale,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_block, stride_kv, stride_tok, stride_head,
                   stride_table, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                   DOT_F32: tl.constexpr, PREC: tl.constexpr):
    # One program: BLOCK_Q query tokens of one piece x the GROUP query heads of one kv head,
    # as BLOCK_Q * GROUP_P2 rows (token-major), so each K/V tile is loaded once per group.
    qb = tl.program_id(0)
    piece = tl.program_id(1)
    kvh = tl.program_id(2)
    row0 = tl.load(cu_ptr + piece).to(tl.int32)
    rows = tl.load(cu_ptr + piece + 1).to(tl.int32) - row0
    if qb * BLOCK_Q >= rows:
        return
    start_pos = tl.load(start_ptr + piece).to(tl.int32)
    offs_r = tl.arange(0, BLOCK_Q * GROUP_P2)
    tok = qb * BLOCK_Q + offs_r // GROUP_P2
    head = kvh * GROUP + offs_r % GROUP_P2
    mask_r = (tok < rows) & (offs_r % GROUP_P2 < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + (row0 + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = start_pos + tok
    kv_end = start_pos + tl.minimum(rows, (qb + 1) * BLOCK_Q)  # keys [0, kv_end) are visible to some row
    m_i = tl.full([BLOCK_Q * GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P2, BLOCK_D], dtype=tl.float32)
    base = kv_ptr + layer_off + kvh * stride_head
    table = tables_ptr + piece * stride_table
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        block = tl.load(table + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        kv_tok = block * stride_block + (offs_n % PAGE) * stride_tok
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(base + kv_tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + stride_kv + kv_tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (row0 + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


LOG2E = 1.4426950408889634


def _dot_flags(dtype: torch.dtype, interpret: bool) -> tuple[bool, str]:
    """(widen bf16 dot operands to fp32, dot input precision)."""
    return interpret and dtype == torch.bfloat16, "ieee" if dtype == torch.float32 else "tf32"


def _check_pool(pool: torch.Tensor) -> None:
    if pool.dim() != 6 or pool.stride(-1) != 1 or pool.stride(-2) != pool.shape[-1]:
        raise ValueError("pool must be [blocks, layers, 2, page, kv_heads, head_dim] with contiguous heads")
    if pool.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1, "
                           "set before triton is first imported")


# Tile sizes: not tuned on a GPU (none was available). They are the ones that compile for sm_90
# (H100/H200) without register spills (tools/triton_aot_check.py: ptxas resource usage, checked
# ahead of time on a machine without a GPU); under the interpreter larger tiles mean fewer steps.


def store_meta(row: int, page: int, interpret: bool = INTERPRET) -> dict:
    """Constexprs and launch options of `_store_kv_kernel` for a token row of `row` elements."""
    block_row = triton.next_power_of_2(row)
    block_t = 64 if interpret else max(1, 4096 // block_row)  # ~4k elements per program
    return dict(ROW=row, BLOCK_ROW=block_row, BLOCK_T=block_t, PAGE=page, num_warps=8)


def decode_meta(heads: int, kv_heads: int, head_dim: int, page: int, num_splits: int, min_split_tokens: int,
                dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """Constexprs and launch options of `_decode_split_kernel`."""
    group = heads // kv_heads
    use_dot = group > 1
    dot_f32, prec = _dot_flags(dtype, interpret)
    block_n = 64 if interpret or (head_dim <= 128 and dtype != torch.float32) else 32
    return dict(GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)) if use_dot else 1, HEAD_DIM=head_dim,
                BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
                PAGE=page, NUM_SPLITS=num_splits, MIN_SPLIT=max(1, min_split_tokens), USE_DOT=use_dot,
                DOT_F32=dot_f32, PREC=prec, num_warps=8, num_stages=2)


def merge_meta(head_dim: int, num_splits: int) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), NUM_SPLITS=num_splits,
                BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)


def extend_meta(heads: int, kv_heads: int, head_dim: int, page: int, dtype: torch.dtype,
                interpret: bool = INTERPRET) -> dict:
    """Constexprs and launch options of `_extend_kernel`."""
    group = heads // kv_heads
    group_p2 = triton.next_power_of_2(group)
    if interpret:
        block_m, block_n, warps = 64, 64, 4
    elif dtype == torch.float32:  # IEEE fp32 dots run on FMA units with more registers
        block_m, block_n, warps = (32, 16, 8) if head_dim <= 128 else (16, 16, 8)
    elif head_dim <= 128:
        block_m, block_n, warps = 128, 32, 8
    else:
        block_m, block_n, warps = 32, 16, 8
    dot_f32, prec = _dot_flags(dtype, interpret)
    return dict(GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                BLOCK_Q=max(1, block_m // group_p2), BLOCK_N=block_n, PAGE=page, DOT_F32=dot_f32, PREC=prec,
                num_warps=warps, num_stages=2)


def store_kv(pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write `k`, `v` ([T, kv_heads, head_dim]) of `layer` at `slots` ([T] block * page + offset; -1: skip)."""
    _check_pool(pool)
    t = k.shape[0]
    if t == 0:
        return
    row = pool.shape[4] * pool.shape[5]
    k2, v2 = k.reshape(t, row), v.reshape(t, row)
    if k2.stride(1) != 1 or v2.stride(1) != 1:
        k2, v2 = k2.contiguous(), v2.contiguous()
    meta = store_meta(row, pool.shape[3])
    grid = (triton.cdiv(t, meta["BLOCK_T"]),)
    _store_kv_kernel[grid](k2, v2, pool, slots, t, layer * pool.stride(1), k2.stride(0), v2.stride(0),
                           pool.stride(0), pool.stride(2), pool.stride(3), **meta)


def decode_attention(q: torch.Tensor, pool: torch.Tensor, layer: int, tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, out: torch.Tensor, num_splits: int, min_split_tokens: int = 256) -> torch.Tensor:
    """`out[i] = attention(q[i], the first context_lens[i] keys of row i's table)`; q and out
    `[D, heads, head_dim]`, tables `[D, >= max blocks]`; a row of length 0 gets zeros."""
    _check_pool(pool)
    d, heads, head_dim = q.shape
    kv_heads = pool.shape[4]
    if d == 0:
        return out
    meta = decode_meta(heads, kv_heads, head_dim, pool.shape[3], num_splits, min_split_tokens, q.dtype)
    if num_splits > 1:
        mid_o = torch.empty(d, heads, num_splits, meta["BLOCK_D"], dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(d, heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = out  # unused: one split writes `out` itself
    _decode_split_kernel[(d, kv_heads, num_splits)](
        q, pool, tables, context_lens, mid_o, mid_lse, out, layer * pool.stride(1), scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), pool.stride(0), pool.stride(2), pool.stride(3),
        pool.stride(4), tables.stride(0), **meta)
    if num_splits > 1:
        _decode_merge_kernel[(d, heads)](mid_o, mid_lse, out, out.stride(0), out.stride(1),
                                         **merge_meta(head_dim, num_splits))
    return out


def extend_attention(q: torch.Tensor, pool: torch.Tensor, layer: int, tables: torch.Tensor, cu_rows: torch.Tensor,
                     start_pos: torch.Tensor, max_rows: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Piece i's query rows `[cu_rows[i], cu_rows[i+1])` of q (at sequence positions
    start_pos[i] ...) attend causally to their sequence's keys in the pool (table row i);
    writes those rows of `out`. `max_rows` (a host int) bounds every piece's row count."""
    _check_pool(pool)
    pieces = tables.shape[0]
    if pieces == 0 or max_rows == 0:
        return out
    kv_heads = pool.shape[4]
    meta = extend_meta(q.shape[1], kv_heads, q.shape[2], pool.shape[3], q.dtype)
    grid = (triton.cdiv(max_rows, meta["BLOCK_Q"]), pieces, kv_heads)
    _extend_kernel[grid](q, pool, out, tables, cu_rows, start_pos, layer * pool.stride(1), scale * LOG2E,
                         q.stride(0), q.stride(1), out.stride(0), out.stride(1), pool.stride(0), pool.stride(2),
                         pool.stride(3), pool.stride(4), tables.stride(0), **meta)
    return out

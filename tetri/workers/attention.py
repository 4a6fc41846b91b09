"""Attention over the paged KV pool, behind one interface.

The model runner builds an `AttnBatch` for the step's flat token batch (its integer inputs
arrive on the device in one copy, see `step_inputs.py`) and hands it to the backend's
`prepare`; the backend's `forward(layer, q, k, v)` writes the new K/V into the pool at their
slots and returns the attention output `[T, heads, head_dim]`.

    flat batch:  [ d1 | d2 | d3 | piece A (12 tok, pos 0..11) | piece B (7 tok, pos 64..70) ]
                   decodes: one   prefill, no cache: causal     prefill over cached KV:
                   token each     on its own K/V                cached prefix + own keys

Backends (`make_attention`):
- `torch` (the CPU path; also runs on CUDA): SDPA per prefill piece and one padded SDPA for
  the decode tokens; `is_causal=True` would align the mask wrongly when queries are fewer
  than keys, so cached pieces get an explicit mask. On CPU the decodes attend over K/V kept
  staged across steps (`decode_stage.py`); on CUDA the stage is off (it would compete with
  the pool for memory) and decodes gather their blocks.
- `triton` (the CUDA default; `triton_attn.py`): reads the pool in place through block
  tables, split-KV decode and a varlen causal prefill kernel. Its batch fields are all device
  tensors of fixed meaning, so a decode step can be captured in a CUDA graph
  (`graph_runner.py`). Under `TRITON_INTERPRET=1` it also runs on CPU (the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tetri.workers import cpu_kernels
from tetri.workers.decode_stage import DecodeStage
from tetri.workers.kv_pool import KVPool
from tetri.workers.seq import new_uid

STAGE_BUDGET_SHARE = 1.0
"""On CPU the torch backend's decode staging may hold up to this share of the pool's bytes
(on CUDA none: every byte beside the pool is budgeted, see `memory.py`)."""


@dataclass
class PrefillPiece:
    begin: int  # first row in the flat batch
    end: int
    start_pos: int  # position of row `begin` in its sequence
    block_table: torch.Tensor  # [num_blocks] int64, covers start_pos + (end - begin) tokens
    block_base: torch.Tensor | None = None  # block_table * layers * 2 (rows of `KVPool.block_rows`)


@dataclass
class AttnBatch:
    """Decode rows come first in the flat batch: rows [0, num_decodes) are one-token decodes.
    Index tensors are int64, on the pool's device."""

    slots: torch.Tensor  # [T] block * block_size + offset of each new token; -1: write nothing (padding)
    prefill: list[PrefillPiece]
    num_decodes: int = 0
    decode_tables: torch.Tensor | None = None  # [D, >= max blocks] block ids (padded with block 0)
    decode_context_lens: torch.Tensor | None = None  # [D] keys each decode row attends to (0: padding)
    extend_tables: torch.Tensor | None = None  # [S, max blocks] block table of each prefill piece
    extend_cu_rows: torch.Tensor | None = None  # [S + 1] piece i is rows [cu[i], cu[i+1]) of the flat batch
    extend_start_pos: torch.Tensor | None = None  # [S] position of each piece's first row
    extend_max_rows: int = 0  # the longest piece's row count (host int: the prefill grid)
    # Filled by `TorchAttention.prepare`:
    slot_base: torch.Tensor | None = None  # [T] row of the token's layer-0 K in `KVPool.token_rows`
    decode_block_base: torch.Tensor | None = None  # [D * max_blocks] decode_tables * layers * 2
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_blocks * block_size] bool
    stage_len: int = 0  # keys the staged attention reads (the longest context; 0: gather instead)
    stage_lens: torch.Tensor | None = None  # [D] int64 context length of each stage slot
    stage_rows: torch.Tensor | None = None  # [D * kv_heads] stage-buffer row of each new token's layer-0 K, per head
    stage_slots: torch.Tensor | None = None  # [D] decode row -> stage slot; None: row i is slot i


def key_mask(context_lens: torch.Tensor, num_keys: int) -> torch.Tensor:
    """`[rows, 1, 1, num_keys]` bool: row i attends to its first `context_lens[i]` keys."""
    keys = torch.arange(num_keys, device=context_lens.device)
    return (keys[None, :] < context_lens[:, None])[:, None, None, :]


def stage_budget_bytes(pool_data: torch.Tensor) -> float:
    """What the torch backend's `DecodeStage` may hold: a share of the pool on CPU, 0 on CUDA."""
    return STAGE_BUDGET_SHARE * pool_data.nbytes if pool_data.device.type == "cpu" else 0.0


class TorchAttention:
    name = "torch"

    def __init__(self, pool: KVPool, scale: float) -> None:
        self.pool = pool
        self.scale = scale
        self.batch: AttnBatch | None = None
        self._tokens = pool.token_rows()
        self._blocks = pool.block_rows()
        lay = pool.layout
        self._kv_shape = (lay.num_kv_heads, lay.head_dim)
        self._bs = lay.block_size
        # Gathered K/V land in one reused buffer: a fresh multi-MB tensor per call costs more
        # in page faults than the copy itself.
        self._scratch = torch.empty(0, self._blocks.shape[1], dtype=self._blocks.dtype, device=self._blocks.device)
        budget = stage_budget_bytes(pool.data)
        self._stage = DecodeStage(pool.data, self._bs, budget) if budget > 0 else None
        # Staged decodes' attention: the compiled kernel where it handles this pool, else SDPA.
        self._kernels = cpu_kernels.load() if cpu_kernels.attention_applies(pool.data) else None

    def prepare(self, batch: AttnBatch, decode_segs, context_lens: list[int]) -> None:
        """Derive this backend's fields from the runner's (decode rows: `decode_segs`, with
        `context_lens` keys each)."""
        lay = self.pool.layout
        rows_per_block = 2 * lay.num_layers
        batch.slot_base = (batch.slots // self._bs) * (rows_per_block * self._bs) + batch.slots % self._bs
        for piece in batch.prefill:
            if piece.start_pos:
                piece.block_base = piece.block_table * rows_per_block
        if not batch.num_decodes or self.stage_decodes(batch, decode_segs, context_lens):
            return
        tables = batch.decode_tables  # exactly as wide as the longest context needs
        batch.decode_block_base = tables.reshape(-1) * rows_per_block
        batch.decode_mask = key_mask(batch.decode_context_lens, tables.shape[1] * self._bs)

    def stage_decodes(self, batch: AttnBatch, segs, context_lens: list[int]) -> bool:
        """Attend this step's decodes over staged K/V (see `DecodeStage`): sets the batch's
        stage fields and slot-ordered mask; False when the stage declines (then gather)."""
        if self._stage is None:
            return False
        uids = [seg.uid if seg.uid is not None else new_uid() for seg in segs]  # None: a 1-token prefill piece
        slots = self._stage.plan(uids, context_lens, [seg.block_ids for seg in segs])
        if slots is None:
            return False
        device = self._blocks.device
        by_slot = [0] * len(slots)
        for slot, ctx in zip(slots, context_lens):
            by_slot[slot] = ctx
        stage = self._stage
        batch.stage_len = max(context_lens)
        batch.stage_lens = torch.tensor(by_slot, device=device)
        batch.decode_mask = key_mask(batch.stage_lens, batch.stage_len)
        slot_rows = 2 * stage.layers * stage.heads * stage.capacity  # head_dim-wide rows per slot
        first = torch.tensor([s * slot_rows + c - 1 for s, c in zip(slots, context_lens)], dtype=torch.long,
                             device=device)
        heads = torch.arange(stage.heads, device=device) * stage.capacity
        batch.stage_rows = (first[:, None] + heads).reshape(-1)
        in_order = slots == list(range(len(slots)))
        batch.stage_slots = None if in_order else torch.tensor(slots, dtype=torch.long, device=device)
        return True

    def step_failed(self) -> None:
        if self._stage is not None:
            self._stage.reset()

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.batch
        t = q.shape[0]
        k_rows = b.slot_base + 2 * layer * self._bs
        self._tokens.index_copy_(0, k_rows, k.reshape(t, -1))
        self._tokens.index_copy_(0, k_rows + self._bs, v.reshape(t, -1))
        d = b.num_decodes
        if d == t:
            return self._decode(layer, q, k, v, b)
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(layer, q[:d], k[:d], v[:d], b)
        for piece in b.prefill:
            out[piece.begin:piece.end] = self._prefill(layer, piece, q, k, v)
        return out

    def _gather(self, base: torch.Tensor, layer: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the listed blocks as `[num, blocks_each * block_size, kv_heads, head_dim]`."""
        rows = base + 2 * layer
        n = rows.shape[0]
        if self._scratch.shape[0] < 2 * n:
            self._scratch = torch.empty(2 * n, self._blocks.shape[1], dtype=self._blocks.dtype, device=self._blocks.device)
        k_buf, v_buf = self._scratch[:n], self._scratch[n:2 * n]
        torch.index_select(self._blocks, 0, rows, out=k_buf)
        torch.index_select(self._blocks, 0, rows + 1, out=v_buf)
        return k_buf.view(num, -1, *self._kv_shape), v_buf.view(num, -1, *self._kv_shape)

    def _prefill(self, layer: int, piece: PrefillPiece, q, k, v) -> torch.Tensor:
        qs = q[piece.begin:piece.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if piece.start_pos == 0:
            ks = k[piece.begin:piece.end].transpose(0, 1).unsqueeze(0)
            vs = v[piece.begin:piece.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            return o[0].transpose(0, 1)
        n = piece.end - piece.begin
        ctx = piece.start_pos + n
        ks, vs = self._gather(piece.block_base, layer, 1)
        ks = ks[:, :ctx].transpose(1, 2)
        vs = vs[:, :ctx].transpose(1, 2)
        q_pos = torch.arange(piece.start_pos, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: AttnBatch) -> torch.Tensor:
        if b.stage_len:
            return self._staged_decode(layer, q, k, v, b)
        ks, vs = self._gather(b.decode_block_base, layer, b.num_decodes)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), ks.transpose(1, 2), vs.transpose(1, 2),
                                           attn_mask=b.decode_mask, scale=self.scale, enable_gqa=True)
        return o.squeeze(2)

    def _staged_decode(self, layer: int, q, k, v, b: AttnBatch) -> torch.Tensor:
        d, n, slots = q.shape[0], b.stage_len, b.stage_slots
        stage = self._stage
        rows = stage.buf.view(-1, stage.head_dim)  # one row per (slot, layer, k|v, head, position)
        k_rows = b.stage_rows + 2 * layer * stage.heads * stage.capacity
        rows.index_copy_(0, k_rows, k.reshape(-1, stage.head_dim))
        rows.index_copy_(0, k_rows + stage.heads * stage.capacity, v.reshape(-1, stage.head_dim))
        ks = stage.kv[:d, layer, 0, :, :n]  # [d, kv_heads, n, head_dim]
        vs = stage.kv[:d, layer, 1, :, :n]
        if slots is not None:
            q = torch.empty_like(q).index_copy_(0, slots, q)
        if self._kernels is not None:
            o = cpu_kernels.decode_attention(self._kernels, q, ks, vs, b.stage_lens, self.scale)
        else:
            o = F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=b.decode_mask, scale=self.scale,
                                               enable_gqa=True).squeeze(2)
        return o if slots is None else o.index_select(0, slots)


class TritonAttention:
    """The Triton kernels of `triton_attn.py` behind the backend interface: K/V written with
    `store_kv`, decodes with the split-KV kernel, prefill pieces with the varlen kernel, all
    reading the pool in place. Nothing here reads a host value per layer, so a decode step can
    be captured in a CUDA graph."""

    name = "triton"
    MAX_SPLITS = 16

    def __init__(self, pool: KVPool, scale: float, num_splits: int | None = None, min_split_tokens: int = 256) -> None:
        from tetri.workers import triton_attn  # imported here: TRITON_INTERPRET must be set before triton is

        self.kernels = triton_attn
        self.pool = pool
        self.scale = scale
        self.batch: AttnBatch | None = None
        self.fixed_splits = num_splits
        self.min_split_tokens = min_split_tokens
        dev = pool.data.device
        self._sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1

    def num_splits(self, rows: int) -> int:
        """KV splits of a decode step of `rows` rows: enough programs to fill the GPU twice, from
        the batch size alone (a captured graph keeps its grid); each row uses only as many as
        its length needs (`min_split_tokens` each)."""
        if self.fixed_splits is not None:
            return self.fixed_splits
        programs = rows * self.pool.layout.num_kv_heads
        return max(1, min(self.MAX_SPLITS, -(-2 * self._sms // programs)))

    def prepare(self, batch: AttnBatch, decode_segs, context_lens: list[int]) -> None:
        pass  # the runner's fields are all it reads

    def step_failed(self) -> None:
        pass

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, kern, data = self.batch, self.kernels, self.pool.data
        kern.store_kv(data, layer, k, v, b.slots)
        q = q if q.stride(-1) == 1 else q.contiguous()
        out = torch.empty_like(q)
        d = b.num_decodes
        if d:
            kern.decode_attention(q[:d], data, layer, b.decode_tables, b.decode_context_lens, self.scale, out[:d],
                                  self.num_splits(d), self.min_split_tokens)
        if b.prefill:
            kern.extend_attention(q, data, layer, b.extend_tables, b.extend_cu_rows, b.extend_start_pos,
                                  b.extend_max_rows, self.scale, out)
        return out


BACKENDS = ("auto", "torch", "triton")


def triton_available(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def make_attention(pool: KVPool, scale: float, device: str, backend: str = "auto"):
    """`auto`: Triton on CUDA where triton imports, else torch (the CPU path)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" or (backend == "auto" and triton_available(device)):
        return TritonAttention(pool, scale)
    return TorchAttention(pool, scale)

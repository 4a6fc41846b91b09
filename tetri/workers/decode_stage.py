"""Decode K/V kept contiguous per sequence across steps (the torch attention backend).

The paged pool is block-major (a request's blocks copy to another pool in a few large
copies), so one layer's context of one sequence is scattered over blocks. Gathering every
decode context into one padded batch each step reads and writes as many bytes as the
attention then reads: on CPU, at batch 16 and 256 tokens of context, a fifth of the step.

A `DecodeStage` keeps that padded batch alive between steps instead. Each decoding
sequence owns a slot `[layers, 2, kv_heads, capacity, head_dim]` (head-major: the attention
reads each head's keys as one contiguous run, 1.3x faster than token-major rows at batch
64); a step appends the new token's K/V to its slot (as well as to the pool, which stays
the source of truth) and attends over the slots in place. A sequence is gathered from the
pool only when it first decodes here, or when its slot no longer matches (it was preempted,
which gives it a new `Seq.uid`, or missed a step). Slots are kept dense (a leaving
sequence's slot is refilled by the last one). More slots double the buffer and keep the
staged ones; a context past the capacity picks a larger one and regathers. Past
`budget_bytes` it declines, and the backend falls back to the per-step gather.
"""

from __future__ import annotations

import mmap

import torch

MIN_SLOTS = 16
"""Slots the first buffer holds: each regrowth pays fresh pages, expensive on this CPU."""


def _zeros(numel: int, like: torch.Tensor) -> torch.Tensor:
    """Zeros; on CPU fresh anonymous pages, which read as zero and are only materialized
    where written (`torch.zeros` writes all of them up front: 0.1 s per 300 MB here)."""
    if like.device.type != "cpu" or numel == 0:
        return torch.zeros(numel, dtype=like.dtype, device=like.device)
    pages = mmap.mmap(-1, numel * like.element_size())
    return torch.frombuffer(pages, dtype=like.dtype, count=numel)  # the tensor keeps `pages` alive


class DecodeStage:
    def __init__(self, pool_data: torch.Tensor, block_size: int, budget_bytes: float) -> None:
        # pool_data: [blocks, layers, 2, block_size, kv_heads, head_dim]
        self.pool = pool_data
        self.bs = block_size
        self.layers, self.heads, self.head_dim = pool_data.shape[1], pool_data.shape[4], pool_data.shape[5]
        self.budget_numel = int(budget_bytes // pool_data.element_size())
        # One flat buffer, slot-major: slot s is `[layers, 2, heads, capacity, head_dim]` at
        # s * slot_numel, so more slots fit without moving the ones in use.
        self.buf = torch.zeros(0, dtype=pool_data.dtype, device=pool_data.device)
        self.capacity = 0
        self._view()  # self.kv: [slots, layers, 2, heads, capacity, head_dim]
        self.owner: list[int] = []  # uid of each slot's sequence
        self.staged: list[int] = []  # tokens present in each slot

    def _slot_numel(self, capacity: int) -> int:
        return self.layers * 2 * self.heads * capacity * self.head_dim

    def _view(self) -> None:
        slots = self.buf.numel() // self._slot_numel(self.capacity) if self.capacity else 0
        self.kv = self.buf[:slots * self._slot_numel(self.capacity)].view(
            slots, self.layers, 2, self.heads, self.capacity, self.head_dim)

    def _fit(self, need_slots: int, need_cap: int) -> bool:
        """Make room for `need_slots` slots of `need_cap` tokens within the budget. More slots
        double the buffer and keep the staged ones; a longer context takes a power-of-two
        capacity, or what the budget allows, and a new capacity empties every slot. False
        (and an empty stage) when even the need does not fit."""
        cap = self.capacity
        if need_cap > cap:
            cap = max(1 << (need_cap - 1).bit_length(), self.bs)
        if need_slots * self._slot_numel(cap) > self.budget_numel:
            cap = self.budget_numel // max(1, need_slots * self._slot_numel(1)) // self.bs * self.bs
        if cap < need_cap:
            self.buf, self.capacity, self.owner, self.staged = self.buf[:0], 0, [], []
            self._view()
            return False
        if cap != self.capacity:
            self.capacity, self.owner, self.staged = cap, [], []
        numel = need_slots * self._slot_numel(cap)
        if numel > self.buf.numel():
            numel = max(numel, 2 * self.buf.numel(), MIN_SLOTS * self._slot_numel(cap))
            numel = min(numel, self.budget_numel // self._slot_numel(cap) * self._slot_numel(cap))
            grown = _zeros(numel, self.buf)
            used = len(self.owner) * self._slot_numel(cap)
            grown[:used] = self.buf[:used]
            self.buf = grown
        self._view()
        return True

    def _move(self, src: int, dst: int) -> None:
        n = self.staged[src]
        self.kv[dst, :, :, :, :n] = self.kv[src, :, :, :, :n]
        self.owner[dst], self.staged[dst] = self.owner[src], n

    def _gather(self, slot: int, table: list[int], tokens: int) -> None:
        """One copy per block straight into the slot: an `index_select` into a temporary and a
        permuted copy out of it measured 8x slower (fresh pages, strided writes)."""
        blocks = -(-tokens // self.bs)
        dst = self.kv[slot, :, :, :, :blocks * self.bs].unflatten(3, (blocks, self.bs))
        for j, block in enumerate(table[:blocks]):
            dst[:, :, :, j].copy_(self.pool[block].transpose(2, 3))  # [layers, 2, bs, heads, dim]
        self.staged[slot] = tokens

    def plan(self, uids: list[int], context_lens: list[int], tables: list[list[int]]) -> list[int] | None:
        """Make slot i hold the cached context (`context_lens[i] - 1` tokens) of decode row
        i's sequence, for every row; returns the slot of each row, or None when the stage
        would exceed its budget (then it is emptied and the caller gathers)."""
        rows = len(uids)
        need_cap = max(context_lens)
        if (rows > self.kv.shape[0] or need_cap > self.capacity) and not self._fit(rows, need_cap):
            return None
        wanted = {uid: i for i, uid in enumerate(uids)}
        # Keep the slots of sequences still decoding; move the last kept ones into the holes.
        kept = [uid in wanted and self.staged[s] == context_lens[wanted[uid]] - 1 for s, uid in enumerate(self.owner)]
        n_kept = sum(kept)
        holes = [s for s in range(n_kept) if not kept[s]]
        movers = [s for s in range(n_kept, len(self.owner)) if kept[s]]
        for src, dst in zip(movers, holes):
            self._move(src, dst)
        del self.owner[n_kept:], self.staged[n_kept:]
        slot_of = {uid: s for s, uid in enumerate(self.owner)}
        for i, uid in enumerate(uids):
            if uid not in slot_of:
                slot_of[uid] = len(self.owner)
                self.owner.append(uid)
                self.staged.append(0)
                self._gather(slot_of[uid], tables[i], context_lens[i] - 1)
        for i, uid in enumerate(uids):
            self.staged[slot_of[uid]] = context_lens[i]  # this step appends one token
        return [slot_of[uid] for uid in uids]

    def reset(self) -> None:
        """Forget every slot (a step failed part-way: their contents are unknown)."""
        self.owner, self.staged = [], []

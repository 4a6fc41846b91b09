"""Decode K/V kept contiguous per sequence across steps (the torch attention backend).

The paged pool is block-major (a request's blocks copy to another pool in a few large
copies), so one layer's context of one sequence is scattered over blocks. Gathering every
decode context into one padded batch each step reads and writes as many bytes as the
attention then reads: on CPU, at batch 16 and 256 tokens of context, a fifth of the step.

A `DecodeStage` keeps that padded batch alive between steps instead. Each decoding
sequence owns a slot `[layers, 2, slot, capacity, kv_heads * head_dim]`; a step appends the
new token's K/V to its slot (as well as to the pool, which stays the source of truth) and
attends over the slots in place. A sequence is gathered from the pool only when it first
decodes here, or when its slot no longer matches (it was preempted, which gives it a new
`Seq.uid`, or missed a step). Slots are kept dense (a leaving sequence's slot is refilled by
the last one); when a context outgrows the capacity or the batch outgrows the slots, the
stage grows (doubling) and regathers. Past `budget_bytes` it declines, and the backend falls
back to the per-step gather.
"""

from __future__ import annotations

import torch


class DecodeStage:
    def __init__(self, pool_data: torch.Tensor, block_size: int, budget_bytes: float) -> None:
        # pool_data: [blocks, layers, 2, block_size, kv_heads, head_dim]
        self.pool = pool_data
        self.bs = block_size
        self.layers = pool_data.shape[1]
        self.width = pool_data.shape[4] * pool_data.shape[5]
        self.budget_bytes = budget_bytes
        self.kv = torch.empty(self.layers, 2, 0, 0, self.width, dtype=pool_data.dtype, device=pool_data.device)
        self.owner: list[int] = []  # uid of each slot's sequence
        self.staged: list[int] = []  # tokens present in each slot

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    def _fits(self, slots: int, capacity: int) -> bool:
        bytes_per_token = self.layers * 2 * self.width * self.kv.element_size()
        return slots * capacity * bytes_per_token <= self.budget_bytes

    def _grow(self, slots: int, capacity: int) -> None:
        slots, capacity = max(slots, 2 * self.kv.shape[2]), max(capacity, 2 * self.capacity)
        capacity = -(-capacity // self.bs) * self.bs
        if not self._fits(slots, capacity):
            slots, capacity = max(slots, self.kv.shape[2]), max(capacity, self.capacity)
        # Zeros, not empty: the padded keys past a context are masked, but garbage there could
        # be NaN, which a mask does not cancel.
        self.kv = torch.zeros(self.layers, 2, slots, capacity, self.width, dtype=self.pool.dtype,
                              device=self.pool.device)
        self.owner, self.staged = [], []

    def _move(self, src: int, dst: int) -> None:
        n = self.staged[src]
        self.kv[:, :, dst, :n] = self.kv[:, :, src, :n]
        self.owner[dst], self.staged[dst] = self.owner[src], n

    def _gather(self, slot: int, table: list[int], tokens: int) -> None:
        blocks = -(-tokens // self.bs)
        if blocks:
            ids = torch.tensor(table[:blocks], dtype=torch.long, device=self.pool.device)
            src = self.pool.index_select(0, ids)  # [blocks, layers, 2, bs, heads, dim]
            src = src.permute(1, 2, 0, 3, 4, 5).reshape(self.layers, 2, blocks * self.bs, self.width)
            self.kv[:, :, slot, :tokens] = src[:, :, :tokens]
        self.staged[slot] = tokens

    def plan(self, uids: list[int], context_lens: list[int], tables: list[list[int]]) -> list[int] | None:
        """Make slot i hold the cached context (`context_lens[i] - 1` tokens) of decode row
        i's sequence, for every row; returns the slot of each row, or None when the stage
        would exceed its budget (then it is emptied and the caller gathers)."""
        rows = len(uids)
        need_cap = max(context_lens)
        if not self._fits(rows, -(-need_cap // self.bs) * self.bs):
            self.kv = self.kv[:, :, :0, :0]
            self.owner, self.staged = [], []
            return None
        if rows > self.kv.shape[2] or need_cap > self.capacity:
            self._grow(rows, need_cap)
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

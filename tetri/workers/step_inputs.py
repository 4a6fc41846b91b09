"""A step's integer inputs: packed on the host with numpy, moved to the device in one copy.

`pack_step` flattens a step's segments (decodes first) into arrays: token ids, positions,
KV slots, the decode rows' block tables and lengths, the prefill pieces' varlen metadata and
the rows that sample. `HostStaging.upload` writes them into one pinned host buffer and issues
one non-blocking copy into one device buffer, both reused across steps (on CPU the arrays are
used in place). Building a dozen small tensors from Python lists instead costs a pageable,
synchronous copy each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StepArrays:
    ids: np.ndarray  # [T] token ids, decode rows first
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] block * block_size + offset
    decode_tables: np.ndarray  # [D, max blocks] (padded with block 0)
    decode_ctx: np.ndarray  # [D] keys each decode row attends to (its position + 1)
    extend_tables: np.ndarray  # [S, max blocks]
    extend_cu_rows: np.ndarray  # [S + 1]
    extend_start_pos: np.ndarray  # [S]
    sample_rows: np.ndarray  # [R] rows of the sampling segments, in segment order
    pieces: list[tuple[int, int, int, int]]  # (begin, end, start_pos, blocks used) per prefill piece
    decode_order: list[int]  # segment index of each decode row

    @property
    def parts(self) -> list[np.ndarray]:
        return [self.ids, self.positions, self.slots, self.decode_tables, self.decode_ctx, self.extend_tables,
                self.extend_cu_rows, self.extend_start_pos, self.sample_rows]


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def pack_step(segments, block_size: int) -> StepArrays:
    """Flatten `segments` (`model_runner.Segment`s): one-token segments first, as decode rows."""
    decodes = [i for i, seg in enumerate(segments) if len(seg.token_ids) == 1]
    prefills = [i for i, seg in enumerate(segments) if len(seg.token_ids) != 1]
    total = sum(len(seg.token_ids) for seg in segments)
    ids = np.empty(total, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    slots = np.empty(total, dtype=np.int64)
    last_row = [0] * len(segments)
    d = len(decodes)
    dec_w = max((_blocks(segments[i].start_pos + 1, block_size) for i in decodes), default=0)
    dec_tables = np.zeros((d, dec_w), dtype=np.int64)
    dec_ctx = np.empty(d, dtype=np.int64)
    for row, i in enumerate(decodes):
        seg = segments[i]
        pos = seg.start_pos
        ids[row] = seg.token_ids[0]
        positions[row] = pos
        slots[row] = seg.block_ids[pos // block_size] * block_size + pos % block_size
        used = pos // block_size + 1
        dec_tables[row, :used] = seg.block_ids[:used]
        dec_ctx[row] = pos + 1
        last_row[i] = row
    pieces = []
    ext_w = max((_blocks(segments[i].start_pos + len(segments[i].token_ids), block_size) for i in prefills), default=0)
    ext_tables = np.zeros((len(prefills), ext_w), dtype=np.int64)
    cu = np.empty(len(prefills) + 1, dtype=np.int64)
    cu[0] = d
    starts = np.empty(len(prefills), dtype=np.int64)
    row = d
    for j, i in enumerate(prefills):
        seg = segments[i]
        n = len(seg.token_ids)
        used = _blocks(seg.start_pos + n, block_size)
        table = np.asarray(seg.block_ids[:used], dtype=np.int64)
        pos = np.arange(seg.start_pos, seg.start_pos + n, dtype=np.int64)
        ids[row:row + n] = seg.token_ids
        positions[row:row + n] = pos
        slots[row:row + n] = table[pos // block_size] * block_size + pos % block_size
        ext_tables[j, :used] = table
        starts[j] = seg.start_pos
        pieces.append((row, row + n, seg.start_pos, used))
        row += n
        cu[j + 1] = row
        last_row[i] = row - 1
    sample_rows = np.asarray([last_row[i] for i, seg in enumerate(segments) if seg.sample], dtype=np.int64)
    return StepArrays(ids, positions, slots, dec_tables, dec_ctx, ext_tables, cu, starts, sample_rows, pieces,
                      decodes)


class HostStaging:
    """One host buffer (pinned on CUDA) and one device buffer, reused: `upload` copies a list
    of int64 arrays in one non-blocking copy and returns device views shaped like them."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.int64)
        self._dev = torch.empty(0, dtype=torch.int64, device=self.device)
        self._copied = None  # CUDA event of the last copy out of the host buffer
        self.copies = 0  # host-to-device copies issued
        self.grows = 0  # times the buffers were reallocated

    def _grow(self, numel: int) -> None:
        numel = max(numel, 2 * self._host.numel(), 1024)
        self._host = torch.empty(numel, dtype=torch.int64, pin_memory=True)
        self._dev = torch.empty(numel, dtype=torch.int64, device=self.device)
        self.grows += 1

    def upload(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        sizes = [p.size for p in parts]
        total = sum(sizes)
        if not self.cuda:  # the arrays are the tensors; nothing to copy
            flat = torch.from_numpy(np.concatenate([p.reshape(-1) for p in parts]) if parts else np.empty(0, np.int64))
        else:
            if self._copied is not None:
                self._copied.synchronize()  # the previous step's copy has left the host buffer
            if total > self._host.numel():
                self._grow(total)
            host = self._host.numpy()
            at = 0
            for p, n in zip(parts, sizes):
                host[at:at + n] = p.reshape(-1)
                at += n
            flat = self._dev[:total]
            flat.copy_(self._host[:total], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
            self.copies += 1
        out, at = [], 0
        for p, n in zip(parts, sizes):
            out.append(flat[at:at + n].view(p.shape))
            at += n
        return out

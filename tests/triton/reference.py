"""Random paged pools and the plain-SDPA reference the Triton kernels are checked against."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


class PagedCase:
    """A pool `[blocks, layers, 2, page, kv_heads, head_dim]` filled with NaN except the
    tokens each sequence holds, and block tables drawn from shuffled ids with unused blocks
    between them (holes): a kernel that reads a wrong block or a token past a length reads NaN."""

    def __init__(self, lengths: list[int], page: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: str, layers: int = 2, seed: int = 0, spare_blocks: int = 5) -> None:
        rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.lengths, self.page, self.dtype, self.device = lengths, page, dtype, device
        need = [max(1, -(-n // page)) for n in lengths]
        num_blocks = sum(need) + len(need) + spare_blocks  # room for a hole before each table
        ids = list(range(num_blocks))
        rng.shuffle(ids)
        self.tables: list[list[int]] = []
        at = 0
        for n in need:
            at += rng.randint(0, 1)  # a hole now and then
            self.tables.append(ids[at:at + n])
            at += n
        assert at <= num_blocks
        self.pool = torch.full((num_blocks, layers, 2, page, kv_heads, head_dim), float("nan"), dtype=dtype)
        for table, n in zip(self.tables, lengths):
            self.fill(table, 0, n)
        self.pool = self.pool.to(device)

    def rand(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.dtype)

    def fill(self, table: list[int], begin: int, end: int) -> None:
        for pos in range(begin, end):
            self.pool[table[pos // self.page], :, :, pos % self.page] = self.rand(*self.pool.shape[1:3], *self.pool.shape[4:])

    def table_tensor(self, width: int | None = None, rows: list[int] | None = None) -> torch.Tensor:
        rows = range(len(self.tables)) if rows is None else rows
        width = width or max(len(self.tables[r]) for r in rows)
        out = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            out[i, :len(self.tables[r])] = torch.tensor(self.tables[r])
        return out.to(self.device)

    def keys(self, seq: int, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first n tokens of `seq`, `[kv_heads, n, head_dim]` in fp32."""
        kv = self.pool[torch.tensor(self.tables[seq], device=self.pool.device), layer].float().cpu()
        k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:n].transpose(0, 1)
        v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:n].transpose(0, 1)
        return k, v


def ref_decode(case: PagedCase, q: torch.Tensor, layer: int, lengths: list[int], scale: float) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i, n in enumerate(lengths):
        if n:
            k, v = case.keys(i, layer, n)
            out[i] = F.scaled_dot_product_attention(q[i].float().cpu()[:, None], k, v, scale=scale,
                                                    enable_gqa=True)[:, 0]
    return out


def ref_extend(case: PagedCase, q: torch.Tensor, layer: int, pieces: list[tuple[int, int, int]],
               scale: float) -> torch.Tensor:
    """pieces: (first row, rows, start position) per sequence, in table order."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for seq, (row0, rows, start) in enumerate(pieces):
        n = start + rows
        k, v = case.keys(seq, layer, n)
        qs = q[row0:row0 + rows].float().cpu().transpose(0, 1)
        mask = torch.arange(n)[None, :] <= torch.arange(start, n)[:, None]
        out[row0:row0 + rows] = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale,
                                                               enable_gqa=True).transpose(0, 1)
    return out

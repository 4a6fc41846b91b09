"""Attention over the paged KV pool, behind one interface.

The model runner builds an `AttnBatch` for the step's flat token batch; a backend's
`forward(layer, q, k, v)` writes the new K/V into the pool at their slots and returns the
attention output `[T, heads, head_dim]`.

    flat batch:  [ piece A (12 tok, pos 0..11) | piece B (7 tok, pos 64..70) | d1 | d2 | d3 ]
                   prefill, no cache: causal     prefill over cached KV:       decodes: one
                   on its own K/V                explicit mask (cached+new)     padded batch

The torch backend (CPU and CUDA) attends per prefill piece and in one padded batch for the
decode tokens; `is_causal=True` would align the mask wrongly when queries are fewer than
keys, so cached pieces get an explicit mask. The flash-attn backend (CUDA, when
`import flash_attn` works) uses the pool's block table directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tetri.workers.kv_pool import KVPool


@dataclass
class PrefillPiece:
    begin: int  # first row in the flat batch
    end: int
    start_pos: int  # position of row `begin` in its sequence
    block_table: torch.Tensor  # [num_blocks] int64, covers start_pos + (end - begin) tokens


@dataclass
class AttnBatch:
    slot_blocks: torch.Tensor  # [T] block id of each new token
    slot_offsets: torch.Tensor  # [T] offset inside the block
    prefill: list[PrefillPiece]
    decode_rows: torch.Tensor | None = None  # [D] rows of the flat batch that are decodes
    decode_tables: torch.Tensor | None = None  # [D, max_blocks] (padded with block 0)
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_blocks * block_size] bool
    decode_context_lens: torch.Tensor | None = None  # [D] int32 (flash backend)


class TorchAttention:
    name = "torch"

    def __init__(self, pool: KVPool, scale: float) -> None:
        self.pool = pool
        self.scale = scale
        self.batch: AttnBatch | None = None

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.batch
        kv = self.pool.layer(layer)
        kv[b.slot_blocks, 0, b.slot_offsets] = k
        kv[b.slot_blocks, 1, b.slot_offsets] = v
        out = torch.empty_like(q)
        for piece in b.prefill:
            out[piece.begin:piece.end] = self._prefill(kv, piece, q, k, v)
        if b.decode_rows is not None:
            out[b.decode_rows] = self._decode(kv, q[b.decode_rows], b)
        return out

    def _prefill(self, kv, piece: PrefillPiece, q, k, v) -> torch.Tensor:
        qs = q[piece.begin:piece.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if piece.start_pos == 0:
            ks = k[piece.begin:piece.end].transpose(0, 1).unsqueeze(0)
            vs = v[piece.begin:piece.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
            return o[0].transpose(0, 1)
        n = piece.end - piece.begin
        ctx = piece.start_pos + n
        g = kv.index_select(0, piece.block_table)  # [nb, 2, bs, kvh, d]
        ks = g[:, 0].reshape(-1, *g.shape[-2:])[:ctx].transpose(0, 1).unsqueeze(0)
        vs = g[:, 1].reshape(-1, *g.shape[-2:])[:ctx].transpose(0, 1).unsqueeze(0)
        q_pos = torch.arange(piece.start_pos, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)

    def _decode(self, kv, q: torch.Tensor, b: AttnBatch) -> torch.Tensor:
        num, max_blocks = b.decode_tables.shape
        g = kv.index_select(0, b.decode_tables.reshape(-1))  # [D*MB, 2, bs, kvh, d]
        g = g.view(num, max_blocks, *g.shape[1:])
        kvh, d = g.shape[-2:]
        ks = g[:, :, 0].reshape(num, -1, kvh, d).transpose(1, 2)  # [D, kvh, L, d]
        vs = g[:, :, 1].reshape(num, -1, kvh, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=b.decode_mask,
                                           scale=self.scale, enable_gqa=True)
        return o.squeeze(2)


def flash_available(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


class FlashAttention(TorchAttention):
    """flash-attn 2: varlen prefill over the pieces' own K/V when uncached, and
    `flash_attn_with_kvcache` with the block table for decodes and cached pieces."""

    name = "flash"

    def _prefill(self, kv, piece, q, k, v):
        from flash_attn import flash_attn_with_kvcache

        qs = q[piece.begin:piece.end].unsqueeze(0)
        ctx = torch.tensor([piece.start_pos + piece.end - piece.begin], dtype=torch.int32, device=q.device)
        return flash_attn_with_kvcache(qs, kv[:, 0], kv[:, 1], cache_seqlens=ctx,
                                       block_table=piece.block_table[None].int(), softmax_scale=self.scale,
                                       causal=True)[0]

    def _decode(self, kv, q, b):
        from flash_attn import flash_attn_with_kvcache

        o = flash_attn_with_kvcache(q.unsqueeze(1), kv[:, 0], kv[:, 1], cache_seqlens=b.decode_context_lens,
                                    block_table=b.decode_tables.int(), softmax_scale=self.scale, causal=True)
        return o.squeeze(1)


def make_attention(pool: KVPool, scale: float, device: str, backend: str = "auto") -> TorchAttention:
    if backend == "flash" or (backend == "auto" and flash_available(device)):
        return FlashAttention(pool, scale)
    return TorchAttention(pool, scale)

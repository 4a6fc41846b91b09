"""Runs one forward pass over a step's segments and returns the logits of sampling rows.

A `Segment` is a run of consecutive tokens of one sequence: a prefill piece (many tokens,
maybe starting past cached KV) or a decode token (one). The runner flattens all segments
into one token batch, computes each token's KV slot from the sequence's block table, and
asks the model for the final hidden state of the rows that sample (a prompt's last piece,
every decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetri.workers.attention import AttnBatch, PrefillPiece, key_mask, make_attention
from tetri.workers.kv_pool import KVPool
from tetri.workers.models.loader import LoadedModel


@dataclass
class Segment:
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    """The sequence's whole block table; covers start_pos + len(token_ids) tokens."""
    sample: bool
    uid: int | None = None
    """The decoding sequence's `Seq.uid` (lets the attention backend keep its K/V staged
    across steps); None: not staged."""
    score_ids: list[int] | None = None
    """Prompt logprobs: the token each row is scored against (`workers/prompt_logprobs.py`)."""
    score_top: int = 0
    """How many top alternatives each scored row reports."""


class ModelRunner:
    def __init__(self, loaded: LoadedModel, pool: KVPool, device: str, attention: str = "auto") -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.pool = pool
        self.device = device
        self.block_size = pool.layout.block_size
        self.num_layers = pool.layout.num_layers
        self.attn = make_attention(pool, loaded.spec.head_dim ** -0.5, device, attention)
        self.last_hidden: torch.Tensor | None = None
        """Final hidden state of each sampling row of the last step (the length predictor's probe)."""
        self.last_scores: list | None = None
        """Prompt logprobs of the last step, per segment (None: no segment asked)."""

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def build(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor, AttnBatch, list[int]]:
        """Flatten segments (decodes first), computing KV slots and the rows that sample."""
        bs = self.block_size
        rows_per_block = 2 * self.num_layers
        decodes = [i for i, seg in enumerate(segments) if len(seg.token_ids) == 1]
        order = decodes + [i for i, seg in enumerate(segments) if len(seg.token_ids) != 1]
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        prefill: list[PrefillPiece] = []
        last_row = [0] * len(segments)
        for i in order:
            seg = segments[i]
            n = len(seg.token_ids)
            begin = len(ids)
            ids.extend(seg.token_ids)
            for pos in range(seg.start_pos, seg.start_pos + n):
                positions.append(pos)
                slot_blocks.append(seg.block_ids[pos // bs])
                slot_offsets.append(pos % bs)
            if n > 1:
                used = -(-(seg.start_pos + n) // bs)
                table = self._tensor(seg.block_ids[:used])
                prefill.append(PrefillPiece(begin, begin + n, seg.start_pos, table, table * rows_per_block))
            last_row[i] = begin + n - 1
        blocks_t, offsets_t = self._tensor(slot_blocks), self._tensor(slot_offsets)
        batch = AttnBatch(blocks_t, offsets_t, blocks_t * (rows_per_block * bs) + offsets_t, prefill)
        if decodes:
            self._add_decodes(batch, [segments[i] for i in decodes])
        sample_rows = [last_row[i] for i, seg in enumerate(segments) if seg.sample]
        return self._tensor(ids), self._tensor(positions), batch, sample_rows

    def _add_decodes(self, batch: AttnBatch, segs: list[Segment]) -> None:
        bs = self.block_size
        ctx = [s.start_pos + 1 for s in segs]
        batch.num_decodes = len(segs)
        if self.attn.stage_decodes(batch, segs, ctx):
            return  # staged: no block tables or context lengths to read
        batch.decode_context_lens = self._tensor(ctx, torch.int32)
        max_blocks = -(-max(ctx) // bs)
        tables = [s.block_ids[: -(-c // bs)] + [0] * (max_blocks - (-(-c // bs))) for s, c in zip(segs, ctx)]
        batch.decode_tables = self._tensor(tables)
        batch.decode_block_base = batch.decode_tables.reshape(-1) * (2 * self.num_layers)
        batch.decode_mask = key_mask(self._tensor(ctx), max_blocks * bs)

    @torch.inference_mode()
    def run(self, segments: list[Segment]) -> torch.Tensor:
        """Logits `[num_sampling_rows, vocab]` (float32), rows in segment order."""
        ids, positions, batch, sample_rows = self.build(segments)
        self.attn.batch = batch
        try:
            hidden = self.model(ids, positions, self.attn)
        except BaseException:
            self.attn.step_failed()
            raise
        finally:
            self.attn.batch = None
        self.last_scores = None
        if any(seg.score_ids is not None for seg in segments):
            from tetri.workers.prompt_logprobs import score_segments

            self.last_scores = score_segments(self.model, hidden, segments)
        picked = hidden[self._tensor(sample_rows)] if sample_rows else hidden[:0]
        self.last_hidden = picked
        return self.model.compute_logits(picked)

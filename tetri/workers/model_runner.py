"""Runs one forward pass over a step's segments and returns the logits of sampling rows.

A `Segment` is a run of consecutive tokens of one sequence: a prefill piece (many tokens,
maybe starting past cached KV) or a decode token (one). The runner flattens all segments
into one token batch, computes each token's KV slot from the sequence's block table, and
asks the model for the final hidden state of the rows that sample (a prompt's last piece,
every decode).

The step's integer inputs are packed with numpy and reach the device in one copy
(`step_inputs.py`). With the Triton backend, pure-decode steps of up to `max_num_seqs` rows
go through `DecodeGraphs` (static buffers; CUDA graphs on CUDA unless `enforce_eager`, a
direct call otherwise); every other step runs eagerly here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tetri.workers.attention import AttnBatch, PrefillPiece, make_attention
from tetri.workers.kv_pool import KVPool
from tetri.workers.models.loader import LoadedModel
from tetri.workers.step_inputs import HostStaging, pack_step


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
        self.staging = HostStaging(pool.data.device)
        self.graphs = None
        """`DecodeGraphs` once `use_static_decode` was called (Triton backend only)."""
        self.last_hidden: torch.Tensor | None = None
        """Final hidden state of each sampling row of the last step (the length predictor's probe)."""
        self.last_scores: list | None = None
        """Prompt logprobs of the last step, per segment (None: no segment asked)."""

    def use_static_decode(self, max_num_seqs: int, max_model_len: int, capture: bool) -> None:
        """Route pure-decode steps of up to `max_num_seqs` rows through static buffers, replayed
        from CUDA graphs when `capture` (captured here, after the pool exists), else run directly."""
        from tetri.workers.graph_runner import DecodeGraphs

        if self.attn.name != "triton":
            raise ValueError("static decode steps need the triton attention backend")
        self.graphs = DecodeGraphs(self.model, self.attn, self.block_size, max_num_seqs, max_model_len,
                                   self.loaded.spec.hidden_size, self.loaded.dtype, self.pool.data.device)
        if capture:
            self.graphs.capture()

    def build(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor, AttnBatch, torch.Tensor]:
        """Flatten segments (decodes first): token ids, positions, the attention batch and the
        rows that sample, all on the device."""
        arrays = pack_step(segments, self.block_size)
        (ids, positions, slots, dec_tables, dec_ctx, ext_tables, cu_rows, starts,
         sample_rows) = self.staging.upload(arrays.parts)
        prefill = [PrefillPiece(begin, end, start, ext_tables[j, :used])
                   for j, (begin, end, start, used) in enumerate(arrays.pieces)]
        d = len(arrays.decode_order)
        batch = AttnBatch(slots, prefill, num_decodes=d)
        if d:
            batch.decode_tables, batch.decode_context_lens = dec_tables, dec_ctx
        if prefill:
            batch.extend_tables, batch.extend_cu_rows, batch.extend_start_pos = ext_tables, cu_rows, starts
            batch.extend_max_rows = max(end - begin for begin, end, _, _ in arrays.pieces)
        self.attn.prepare(batch, [segments[i] for i in arrays.decode_order], arrays.decode_ctx.tolist())
        return ids, positions, batch, sample_rows

    @torch.inference_mode()
    def run(self, segments: list[Segment]) -> torch.Tensor:
        """Logits `[num_sampling_rows, vocab]` (float32), rows in segment order."""
        self.last_scores = None
        picked = self._run_static(segments) if self.graphs is not None else None
        if picked is None:
            picked = self._run_eager(segments)
        self.last_hidden = picked
        return self.model.compute_logits(picked)

    def _run_static(self, segments: list[Segment]) -> torch.Tensor | None:
        if not segments or any(len(seg.token_ids) != 1 for seg in segments):
            return None
        hidden = self.graphs.run(segments)
        if hidden is None:  # past the largest static batch
            return None
        rows = [i for i, seg in enumerate(segments) if seg.sample]
        if len(rows) == len(segments):
            return hidden.clone()  # the static buffer is overwritten by the next step
        return hidden[torch.tensor(rows, device=hidden.device)]

    def _run_eager(self, segments: list[Segment]) -> torch.Tensor:
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
        return hidden[sample_rows]

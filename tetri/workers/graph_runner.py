"""Decode steps over static buffers, replayed from CUDA graphs (after nano-vllm's recipe).

A pure-decode step of n rows runs at the smallest captured batch size >= n (the ladder 1, 2,
4, 8, 16, 32, ... up to `max_num_seqs`); past the largest it is not ours (the runner runs it
eagerly, as every prefill). The host writes the step's token ids, positions and block tables
into one pinned buffer and copies them (one non-blocking copy, then two device copies) into
static buffers; padding rows get position -1. Inside the captured region the metadata is
derived on the device from those buffers: each row's KV slot (-1 for padding: `store_kv`
skips it), its context length (0 for padding: its attention output is zero) and its rope
position, then the model's forward writes the final hidden states into a static output whose
first n rows the caller reads (padding rows are ignored).

Every graph is captured largest first into one shared memory pool, after one eager warm-up at
its size (which also compiles the Triton kernels). With `capture=False` (CPU, the tests, and
`--enforce-eager`) the same region runs as a direct call: the padding, buffers and metadata
are exercised the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from tetri.workers.attention import AttnBatch
from tetri.workers.step_inputs import HostStaging

SMALL_SIZES = (1, 2, 4, 8)
SIZE_STEP = 16


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16, up to `max_num_seqs` (always included)."""
    sizes = [s for s in SMALL_SIZES if s < max_num_seqs] + list(range(SIZE_STEP, max_num_seqs, SIZE_STEP))
    return sorted(set(sizes) | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, model, attn, block_size: int, max_num_seqs: int, max_model_len: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.attn = attn
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.device = torch.device(device)
        n = self.max_size
        self.id_pos = torch.zeros(2, n, dtype=torch.int64, device=self.device)  # [0]: token ids, [1]: positions
        self.tables = torch.zeros(n, self.max_blocks, dtype=torch.int64, device=self.device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self.context_lens = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=self.device)
        self.staging = HostStaging(self.device)
        self.batches = {size: AttnBatch(self.slots[:size], [], num_decodes=size, decode_tables=self.tables[:size],
                                        decode_context_lens=self.context_lens[:size]) for size in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        self.steps: dict[int, int] = {}  # size -> steps run at it

    def size_for(self, rows: int) -> int | None:
        """The smallest static batch size that holds `rows`; None past the largest."""
        return next((s for s in self.sizes if s >= rows), None)

    def capture(self) -> None:
        """Capture one graph per size, largest first, sharing one memory pool."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.id_pos[1].fill_(-1)  # capture over padding rows only: nothing is written to the pool
        with torch.inference_mode():
            for size in reversed(self.sizes):
                self._forward(size)  # warm-up: compiles the kernels, settles the allocator
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.graph_pool):
                    self._forward(size)
                if self.graph_pool is None:
                    self.graph_pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def _forward(self, size: int) -> None:
        """The captured region: metadata from the static inputs, then the forward."""
        pos = self.id_pos[1, :size]
        live = pos >= 0
        rope_pos = pos.clamp(min=0)
        block = torch.gather(self.tables[:size], 1, (rope_pos // self.block_size)[:, None])[:, 0]
        self.slots[:size].copy_(torch.where(live, block * self.block_size + rope_pos % self.block_size, -1))
        self.context_lens[:size].copy_(pos + 1)
        self.attn.batch = self.batches[size]
        try:
            hidden = self.model(self.id_pos[0, :size], rope_pos, self.attn)
        finally:
            self.attn.batch = None
        self.hidden[:size].copy_(hidden)

    def run(self, segments) -> torch.Tensor | None:
        """Final hidden states `[n, hidden]` of a step of n one-token segments (a view of the
        static output: read it before the next step), or None when n exceeds the largest size."""
        rows = len(segments)
        size = self.size_for(rows)
        bs = self.block_size
        width = max(seg.start_pos // bs + 1 for seg in segments)
        if size is None or width > self.max_blocks:
            return None
        id_pos = np.zeros((2, size), dtype=np.int64)
        id_pos[1, rows:] = -1
        tables = np.zeros((size, width), dtype=np.int64)
        for r, seg in enumerate(segments):
            id_pos[0, r], id_pos[1, r] = seg.token_ids[0], seg.start_pos
            used = seg.start_pos // bs + 1
            tables[r, :used] = seg.block_ids[:used]
        dev_id_pos, dev_tables = self.staging.upload([id_pos, tables])
        self.id_pos[:, :size].copy_(dev_id_pos)
        self.tables[:size, :width].copy_(dev_tables)
        if size in self.graphs:
            self.graphs[size].replay()
        else:
            self._forward(size)
        self.steps[size] = self.steps.get(size, 0) + 1
        return self.hidden[:rows]

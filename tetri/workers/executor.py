"""What every worker role composes: model, KV pool + block accounting, runner and sampler,
with the step-level operations they share (run segments, sample, fork, free)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tetri.config import CacheConfig, ModelConfig
from tetri.sched.kv_blocks import BlockAllocator
from tetri.workers.kv_pool import KVPool, PoolLayout, blocks_for_budget
from tetri.workers.model_runner import ModelRunner, Segment
from tetri.workers.models.loader import LoadedModel, load_model
from tetri.workers.sampler import Sampler, SampleRow
from tetri.workers.seq import Seq, check_stop, new_uid

log = logging.getLogger("tetri.worker")
CPU_DEFAULT_KV_GB = 1.0
CPU_MAX_DEFAULT_BLOCKS = 8192


@dataclass
class SampledToken:
    seq: Seq
    token: int
    finished: bool


def resolve_model_dir(model: str | None) -> str:
    if model is not None:
        return model
    from tetri.workers.models.default_model import ensure_default_model

    return ensure_default_model()


def pool_blocks(cache: CacheConfig, layout1: PoolLayout, device: str, share: float = 1.0) -> int:
    """Pool size in blocks from the config's memory budget."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        budget = max(0.0, total * cache.gpu_memory_utilization * share - (total - free))
        return blocks_for_budget(layout1, budget)
    if cache.kv_cache_gb is not None:
        return blocks_for_budget(layout1, cache.kv_cache_gb * 2**30)
    return min(CPU_MAX_DEFAULT_BLOCKS, blocks_for_budget(layout1, CPU_DEFAULT_KV_GB * 2**30))


MIN_MODEL_LEN = 2
"""The least a pool must hold: a one-token prompt and one output token."""


def cap_max_model_len(requested: int | None, model_limit: int, num_blocks: int, block_size: int) -> int:
    """Prompt + output cap: the model's limit, the operator's `max_model_len`, and what one
    request may hold of this pool (so a request of max_model_len always fits). Raises
    ValueError when the pool cannot hold even a minimal request."""
    pool_tokens = max(0, num_blocks) * block_size
    if pool_tokens < MIN_MODEL_LEN:
        raise ValueError(f"the KV pool holds {max(0, num_blocks)} blocks of {block_size} tokens, too few for even a "
                         f"{MIN_MODEL_LEN}-token request: give it more memory (--kv-cache-gb, "
                         f"--gpu-memory-utilization) or a larger --block-size")
    cap = min(requested or model_limit, model_limit)
    if pool_tokens < cap:
        if requested:
            log.warning("max_model_len %d capped to %d: one request must fit this worker's KV pool (%d blocks of %d)",
                        requested, pool_tokens, num_blocks, block_size)
        cap = pool_tokens
    return cap


class Executor:
    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, shared_pool: bool = False,
                 memory_share: float = 1.0, loaded: LoadedModel | None = None) -> None:
        device = model_cfg.device
        self.device = device
        self.loaded = loaded or load_model(resolve_model_dir(model_cfg.model), model_cfg.dtype, device)
        spec = self.loaded.spec
        limit = spec.max_position_embeddings
        if spec.sliding_window:
            limit = min(limit, spec.sliding_window)  # attention is exact only inside the window
        self.eos_token_ids = self.loaded.eos_token_ids
        layout1 = PoolLayout.for_model(spec, 1, cache_cfg.block_size, self.loaded.dtype)
        num_blocks = pool_blocks(cache_cfg, layout1, device, memory_share)
        self.max_model_len = cap_max_model_len(model_cfg.max_model_len, limit, num_blocks, cache_cfg.block_size)
        layout = PoolLayout.for_model(spec, num_blocks, cache_cfg.block_size, self.loaded.dtype)
        self.pool = KVPool.allocate(layout, device, shared=shared_pool)
        self.blocks = BlockAllocator(num_blocks, cache_cfg.block_size)
        self.block_size = cache_cfg.block_size
        self.runner = ModelRunner(self.loaded, self.pool, device)
        self.sampler = Sampler(self.eos_token_ids, model_cfg.seed)

    def close(self) -> None:
        self.pool.close()

    def run(self, segments: list[Segment], sample_seqs: list[list[Seq]]) -> list[SampledToken]:
        """Forward `segments`; for each sampling segment (in order) sample one token for each
        seq of the matching `sample_seqs` entry (several when n choices share a prefill)."""
        logits = self.runner.run(segments)
        rows: list[SampleRow] = []
        index: list[int] = []
        for i, seqs in enumerate(sample_seqs):
            for s in seqs:
                rows.append(SampleRow(s.params, s.sample_output_ids, s.sample_prompt_ids, s.choice))
                index.append(i)
        if not rows:
            return []
        if len(index) != logits.shape[0]:
            logits = logits[torch.tensor(index, device=logits.device)]
        tokens, logprobs = self.sampler.sample(logits, rows)
        out = []
        flat = [s for seqs in sample_seqs for s in seqs]
        for seq, tok, lp in zip(flat, tokens, logprobs):
            seq.output_ids.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            reason = check_stop(seq, tok, self.eos_token_ids, self.max_model_len)
            seq.finish_reason = reason
            out.append(SampledToken(seq, tok, reason is not None))
        return out

    def fork(self, src: Seq, dst: Seq) -> None:
        """Give `dst` a private copy of `src`'s KV blocks (n > 1 choices)."""
        src_ids = self.blocks.blocks_of(src.key)
        dst_ids = self.blocks.allocate(dst.key, len(src_ids))
        self.pool.copy_within(src_ids, dst_ids)
        dst.num_computed = src.num_computed

    def free(self, seq: Seq) -> int:
        seq.uid = new_uid()  # its KV is gone: whatever was staged for it is stale
        return self.blocks.free(seq.key)

    def decode_segment(self, seq: Seq) -> Segment:
        pos = seq.num_tokens - 1
        return Segment([seq.token_at(pos)], pos, self.blocks.blocks_of(seq.key), True, seq.uid)

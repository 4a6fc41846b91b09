"""What every worker role composes: model, KV pool + block accounting, runner and sampler,
with the step-level operations they share (run segments, sample, fork, free)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.sched.kv_blocks import BlockAllocator
from tetri.sched.prefix_hash import cacheable_blocks, extend_block_hashes, hash_seed
from tetri.workers.kv_pool import HostPool, KVPool, PoolLayout, blocks_for_budget
from tetri.workers.kv_swap import SwapCopier
from tetri.workers.memory import SAMPLER_WORKSPACE, CudaUsage, bind_device, measure_cuda_usage, plan_pool
from tetri.workers.model_runner import ModelRunner, Segment
from tetri.workers.models.loader import LoadedModel, load_model
from tetri.types import FinishReason
from tetri.workers.grammar import GrammarRuntime
from tetri.workers.sampler import Sampler, SampleRow
from tetri.workers.sampling_batch import to_device
from tetri.workers.seq import Seq, check_stop, new_uid

log = logging.getLogger("tetri.executor")
CPU_DEFAULT_KV_GB = 1.0
CPU_MAX_DEFAULT_BLOCKS = 8192


@dataclass
class SampledToken:
    seq: Seq
    token: int
    finished: bool


def resolve_model_dir(model: str | None, dtype: str = "auto", device: str = "cpu") -> str:
    """A Hugging Face directory for `model` (a directory, a GGUF file, or None: the default);
    see `tetri.workers.models.source`, which the front process imports instead (no torch)."""
    from tetri.workers.models.source import resolve_model_dir as resolve

    return resolve(model, dtype, device)


def pool_blocks(cache: CacheConfig, layout1: PoolLayout, device: str, share: float = 1.0,
                usage: CudaUsage | None = None, graph_bytes: int = 0, sampler_bytes: int = 0,
                min_blocks: int = 1) -> int:
    """Pool size in blocks: the config's exact count, else on CUDA this worker's share of the
    device's total memory minus what it measured itself (`memory.plan_pool`), else (CPU) the
    configured or default GiB."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.startswith("cuda"):
        total = torch.cuda.mem_get_info(torch.device(device))[1]
        return plan_pool(total, cache.gpu_memory_utilization, share, usage or CudaUsage(0, 0, 0), graph_bytes,
                         sampler_bytes, layout1.block_bytes, min_blocks).num_blocks
    if cache.kv_cache_gb is not None:
        return blocks_for_budget(layout1, cache.kv_cache_gb * 2**30)
    return min(CPU_MAX_DEFAULT_BLOCKS, blocks_for_budget(layout1, CPU_DEFAULT_KV_GB * 2**30))


def cache_for_role(cache: CacheConfig, role: str) -> CacheConfig:
    """A worker's cache config: the prefix cache's host tier (`--kv-offloading-size`) only on
    workers that start in a prefilling role, where cached prompt blocks live (a decode worker
    would pin host memory it never fills), and the KV swap's space (`--swap-space`) only on decode
    and mixed workers, whose cores swap preempted requests out."""
    if role == "decode" and cache.kv_offloading_size:
        return dataclasses.replace(cache, kv_offloading_size=0.0)
    if role not in ("decode", "mixed") and cache.swap_space:  # a prefill core never preempts
        return dataclasses.replace(cache, swap_space=0.0)
    return cache


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
                 memory_share: float = 1.0, loaded: LoadedModel | None = None,
                 sched: EngineSchedConfig | None = None) -> None:
        device = model_cfg.device
        self.device = device
        bind_device(device)
        self.loaded = loaded or load_model(resolve_model_dir(model_cfg.model, model_cfg.dtype, device),
                                           model_cfg.dtype, device)
        spec = self.loaded.spec
        limit = spec.max_position_embeddings
        if spec.sliding_window:
            limit = min(limit, spec.sliding_window)  # attention is exact only inside the window
        self.eos_token_ids = self.loaded.eos_token_ids
        self.max_model_len = min(model_cfg.max_model_len or limit, limit)  # capped by the pool below
        num_blocks = self._build_pool_and_runner(model_cfg, cache_cfg, sched or EngineSchedConfig(), shared_pool,
                                                 memory_share)
        offload_blocks = HostPool.blocks_for(self.pool.layout, cache_cfg.kv_offloading_size) \
            if cache_cfg.enable_prefix_caching else 0
        host_blocks = offload_blocks + HostPool.blocks_for(self.pool.layout, cache_cfg.swap_space)
        self.host_pool = HostPool(self.pool, host_blocks) if host_blocks else None
        self.blocks = BlockAllocator(num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching, host_blocks,
                                     self.host_pool.copy if self.host_pool else None, offload_evicted=offload_blocks > 0)
        if host_blocks:
            log.info("host tier (prefix cache + swap): %d blocks (%.2f GiB%s)", host_blocks,
                     host_blocks * self.pool.layout.block_bytes / 2**30, ", pinned" if self.host_pool.pinned else "")
        self.swapper = SwapCopier(self.host_pool, device) if self.host_pool else None  # the KV swap's copies
        self.block_size = cache_cfg.block_size
        self.hash_seed = hash_seed(self.loaded.model_dir)
        self.sampler = Sampler(self.eos_token_ids, model_cfg.seed)
        self.grammar = GrammarRuntime(self.loaded.model_dir, self.loaded.spec.vocab_size, self.eos_token_ids)

    def _build_pool_and_runner(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, sched: EngineSchedConfig,
                               shared_pool: bool, memory_share: float) -> int:
        """Size and allocate the pool (on CUDA after measuring this process's own warm-up
        peak), build the runner, and route decode steps through static buffers (captured
        CUDA graphs on CUDA unless `enforce_eager`) where the backend allows."""
        device, spec, dtype = self.device, self.loaded.spec, self.loaded.dtype
        layout1 = PoolLayout.for_model(spec, 1, cache_cfg.block_size, dtype)
        cuda = device.startswith("cuda")
        usage, graph_bytes, sampler_bytes = None, 0, 0
        if cuda and cache_cfg.num_blocks is None:
            usage = measure_cuda_usage(self.loaded, layout1, device, sched.max_step_prompt_tokens,
                                       sched.max_num_seqs, model_cfg.attention)  # the largest mixed step
            static = sched.max_num_seqs * (8 * -(-self.max_model_len // cache_cfg.block_size) + 32
                                           + spec.hidden_size * dtype.itemsize)  # DecodeGraphs' buffers
            graph_bytes = static + (0 if model_cfg.enforce_eager else usage.decode_activation_bytes)
            sampler_bytes = SAMPLER_WORKSPACE * sched.max_num_seqs * spec.vocab_size * 4
        min_blocks = -(-sched.chunk_size // cache_cfg.block_size) + 1
        num_blocks = pool_blocks(cache_cfg, layout1, device, memory_share, usage, graph_bytes, sampler_bytes,
                                 min_blocks)
        self.max_model_len = cap_max_model_len(model_cfg.max_model_len, self.max_model_len, num_blocks,
                                               cache_cfg.block_size)  # one request of it always fits
        layout = PoolLayout.for_model(spec, num_blocks, cache_cfg.block_size, dtype)
        self.pool = KVPool.allocate(layout, device, shared=shared_pool)
        if shared_pool:
            from tetri.workers.kv_stage import with_stage

            with_stage(self.pool)
        self.runner = ModelRunner(self.loaded, self.pool, device, model_cfg.attention)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        if self.runner.attn.name == "triton":
            self.runner.use_static_decode(sched.max_num_seqs, self.max_model_len,
                                          capture=cuda and not model_cfg.enforce_eager)
        if usage is not None:
            log.info("%s: weights %.2f GiB, warm-up activations %.2f GiB, KV pool %d blocks (%.2f GiB), "
                     "decode graphs %.2f GiB (%.2f GiB reserved)", device, usage.weights_bytes / 2**30,
                     usage.activation_bytes / 2**30, num_blocks, layout.nbytes / 2**30,
                     (torch.cuda.memory_allocated(device) - before) / 2**30, graph_bytes / 2**30)
        return num_blocks

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
            logits = logits.index_select(0, to_device(index, torch.long, logits.device))  # n choices of a prompt
        flat = [s for seqs in sample_seqs for s in seqs]
        constrained = self.grammar.mask(logits, flat)  # structured outputs: disallowed tokens -> -inf
        tokens, logprobs = self.sampler.sample(logits, rows)
        refused = self.grammar.accept(flat, tokens) if constrained else ()
        out = []
        for i, (seq, tok, lp) in enumerate(zip(flat, tokens, logprobs)):
            seq.output_ids.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            reason = FinishReason.ERROR if i in refused else check_stop(seq, tok, self.eos_token_ids, self.max_model_len)
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

    def start_swap_out(self, seq: Seq):
        """Start offloading `seq`'s KV to the host tier (`kv_swap`): a `SwapCopy`, after which
        `finish_swap_out` frees its pool blocks; None (nothing done) when the host cannot hold them."""
        ids = self.blocks.begin_swap_out(seq.key)
        if ids is None:
            return None
        seq.uid = new_uid()  # its slots move: whatever was staged for it is stale
        return self.swapper.copy(*ids, to_host=True)

    def finish_swap_out(self, seq: Seq) -> None:
        self.blocks.end_swap_out(seq.key)

    def start_swap_in(self, seq: Seq):
        """Start uploading swapped-out `seq`'s KV into fresh pool blocks: a `SwapCopy`, after
        which `finish_swap_in` frees its host blocks (raises OutOfBlocks)."""
        host_ids, gpu_ids = self.blocks.begin_swap_in(seq.key)
        return self.swapper.copy(host_ids, gpu_ids, to_host=False)

    def finish_swap_in(self, seq: Seq) -> None:
        self.blocks.end_swap_in(seq.key)

    # ---- prefix caching -------------------------------------------------------------------
    def attach_cached_prefix(self, seq: Seq, num_tokens: int, keep_free_blocks: int = 0) -> int:
        """Before `seq` (holding no blocks) prefills its first `num_tokens` tokens: attach the
        cached blocks of its longest cached prefix (GPU-cached, or uploaded from the host tier),
        leaving at least one token to compute and `keep_free_blocks` blocks free, and return
        the tokens they cover (its new `num_computed`). Requests that score their prompt
        (prompt_logprobs) read nothing from the cache, as in vLLM."""
        if not self.blocks.caching or seq.params.prompt_logprobs is not None:
            return 0
        hashes = extend_block_hashes(seq.block_hashes, seq.tokens(0, num_tokens), self.block_size, self.hash_seed)
        seq.num_computed = self.blocks.lookup(seq.key, hashes[:cacheable_blocks(num_tokens, self.block_size)],
                                              num_tokens, keep_free_blocks)
        return seq.num_computed

    def commit_computed(self, seq: Seq, decoded: bool = False) -> None:
        """Cache `seq`'s full blocks whose KV is computed (after the step that computed them);
        `decoded`: the step added one token, so only a block it just filled is new."""
        if not self.blocks.caching:
            return
        n, bs = seq.num_computed, self.block_size
        if decoded and n % bs:
            return
        if n // bs > len(seq.block_hashes):
            extend_block_hashes(seq.block_hashes, seq.tokens(0, n), bs, self.hash_seed, n)
        self.blocks.commit(seq.key, seq.block_hashes[:n // bs], n // bs - 1 if decoded else 0)

    def decode_segment(self, seq: Seq) -> Segment:
        pos = seq.num_tokens - 1
        return Segment([seq.token_at(pos)], pos, self.blocks.blocks_of(seq.key), True, seq.uid)

"""CUDA paths: skipped without a GPU (the conftest skips every `gpu` test when CUDA is absent);
tools/gpu_check.sh runs them on the GPU machine. None of these has run yet: no GPU was
available to the project."""

import pytest
import torch

from tests.engine.test_hf_parity import CHUNK, NEW_TOKENS, prompts
from tests.engine.tiny_models import build, hf_greedy
from tetri import LLM, SamplingParams

pytestmark = pytest.mark.gpu
NUM_BLOCKS = 256  # small pools: gpu_check.sh runs these tests in parallel processes on one GPU


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_cuda_fp32_greedy_matches_hf(tmp_path, enforce_eager):
    d = build("llama", tmp_path / "m")
    ps = prompts()
    expected = [hf_greedy(d, p, NEW_TOKENS) for p in ps]
    llm = LLM(str(d), device="cuda", dtype="float32", chunk_size=CHUNK, check_invariants=True, max_num_seqs=16,
              enforce_eager=enforce_eager, num_blocks=NUM_BLOCKS)
    runner = llm.executor.runner
    assert runner.attn.name == "triton" and bool(runner.graphs.graphs) != enforce_eager
    outs = llm.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    assert [o.token_ids for o in outs] == expected
    assert sum(runner.graphs.steps.values()) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_equals_eager_steps(tmp_path, dtype):
    from tetri.workers.model_runner import Segment

    d = build("qwen3", tmp_path / "m")
    llm = LLM(str(d), device="cuda", dtype=dtype, chunk_size=CHUNK, max_num_seqs=8, num_blocks=64)
    runner = llm.executor.runner
    assert runner.graphs.graphs  # captured
    tables = [[2 * i, 2 * i + 1] for i in range(7)]
    runner.run([Segment(list(range(3, 3 + 10 + i)), 0, t, False) for i, t in enumerate(tables)])
    for rows in ([0, 1, 2, 3, 4, 5, 6], [1, 2, 3], [4]):  # sizes 8 (one padding row), 4, 1
        segs = [Segment([9 + r], 10 + r, tables[r], True) for r in rows]
        eager = runner.model.compute_logits(runner._run_eager(segs))
        pool_eager = runner.pool.data.clone()
        replayed = runner.run(segs)
        tol = 1e-5 if dtype == "float32" else 2e-2
        torch.testing.assert_close(replayed, eager, atol=tol, rtol=tol)
        assert torch.equal(runner.pool.data, pool_eager)


def test_triton_backend_matches_torch_backend_in_bf16(tmp_path):
    d = build("qwen3", tmp_path / "m")
    ps = prompts()
    runs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(d), device="cuda", dtype="bfloat16", chunk_size=CHUNK, attention=backend, max_num_seqs=16,
                  num_blocks=NUM_BLOCKS)
        assert llm.executor.runner.attn.name == backend
        runs[backend] = [o.token_ids for o in llm.generate(ps, SamplingParams(max_tokens=8, temperature=0.0))]
    same = sum(a == b for a, b in zip(runs["torch"], runs["triton"]))
    assert same >= len(ps) - 1  # bf16: allow one near-tie to flip


def test_bind_device_makes_the_workers_gpu_current():
    from tetri.workers.memory import bind_device

    last = torch.cuda.device_count() - 1
    bind_device(f"cuda:{last}")
    assert torch.cuda.current_device() == last
    bind_device("cuda:0")
    assert torch.cuda.current_device() == 0


def test_memory_is_sized_from_this_processs_own_measurement(tmp_path):
    from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
    from tetri.workers.executor import Executor
    from tetri.workers.memory import measure_cuda_usage
    from tetri.workers.models.loader import load_model

    d = build("llama", tmp_path / "m")
    loaded = load_model(str(d), "bfloat16", "cuda")
    param_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    from tetri.workers.kv_pool import PoolLayout

    layout1 = PoolLayout.for_model(loaded.spec, 1, 16, loaded.dtype)
    usage = measure_cuda_usage(loaded, layout1, "cuda:0", chunk_size=256, max_num_seqs=32)
    assert usage.weights_bytes >= param_bytes
    assert 0 < usage.decode_activation_bytes <= usage.activation_bytes
    total = torch.cuda.mem_get_info()[1]
    ex = Executor(ModelConfig(model=str(d), dtype="bfloat16", device="cuda:0"),
                  CacheConfig(gpu_memory_utilization=0.2), memory_share=0.5, loaded=loaded,
                  sched=EngineSchedConfig(chunk_size=256, max_num_seqs=32))
    assert ex.pool.data.nbytes <= total * 0.1 - usage.weights_bytes
    assert ex.pool.data.nbytes >= 0.9 * (total * 0.1 - usage.weights_bytes - 2 * usage.activation_bytes) - 2**28
    assert ex.pool.data.device == torch.device("cuda:0")


def test_cuda_bf16_runs_and_frees_everything(tmp_path):
    d = build("mistral", tmp_path / "m")
    llm = LLM(str(d), device="cuda", dtype="bfloat16", chunk_size=CHUNK, check_invariants=True, num_blocks=NUM_BLOCKS)
    outs = llm.generate(prompts(), SamplingParams(max_tokens=4, temperature=0.0))
    assert all(len(o.token_ids) == 4 for o in outs)
    assert llm.executor.blocks.num_free == llm.executor.blocks.num_blocks

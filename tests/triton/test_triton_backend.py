"""The Triton backend behind the attention interface: the same step as the torch backend, and
greedy output equal to Hugging Face `generate` through the whole engine (fp32; under the
interpreter on CPU here)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.tiny_models import VOCAB, build, hf_greedy
from tests.triton.conftest import DEVICE

pytestmark = pytest.mark.triton
pytest.importorskip("triton")

from tetri import LLM, SamplingParams  # noqa: E402
from tetri.workers.kv_pool import KVPool, PoolLayout  # noqa: E402
from tetri.workers.model_runner import ModelRunner, Segment  # noqa: E402
from tetri.workers.models.loader import load_model  # noqa: E402


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return load_model(str(build("qwen3", tmp_path_factory.mktemp("qwen3"))), "float32", DEVICE)


def _segments() -> list[Segment]:
    """Decodes (a first one, at a block boundary, past it), an uncached piece, a piece over a
    cached prefix, interleaved as a mixed step would have them; block ids shuffled."""
    tables = [[9, 2], [0, 5], [13, 1, 8, 3]]
    return [Segment([5], 0, [6], True, uid=1), Segment(list(range(3, 10)), 0, tables[0], True),
            Segment([7], 15, tables[1], True, uid=2), Segment(list(range(20, 40)), 32, [4, 11, 10, 15], True),
            Segment([8], 16, [12, 14], True, uid=3), Segment(list(range(3, 40)), 16, tables[2], False)]


def test_triton_backend_matches_torch_backend_on_a_mixed_step(qwen3):
    spec = qwen3.spec
    layout = PoolLayout.for_model(spec, 16, 16, torch.float32)
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(layout.shape, generator=gen)
    runs = {}
    for backend in ("torch", "triton"):
        pool = KVPool(layout, data.clone().to(DEVICE), None, owner=True)
        runner = ModelRunner(qwen3, pool, DEVICE, backend)
        assert runner.attn.name == backend
        ids, positions, batch, sample_rows = runner.build(_segments())
        t = ids.shape[0]
        g = torch.Generator().manual_seed(1)
        q = torch.randn(t, spec.num_heads, spec.head_dim, generator=g).to(DEVICE)
        k = torch.randn(t, spec.num_kv_heads, spec.head_dim, generator=g).to(DEVICE)
        v = torch.randn(t, spec.num_kv_heads, spec.head_dim, generator=g).to(DEVICE)
        runner.attn.batch = batch
        out = runner.attn.forward(1, q, k, v)
        runs[backend] = (out.cpu(), pool.data.cpu(), positions.cpu(), sample_rows.cpu())
    torch.testing.assert_close(runs["triton"][0], runs["torch"][0], atol=2e-5, rtol=1e-5)
    assert torch.equal(runs["triton"][1], runs["torch"][1])  # the same K/V rows written, nothing else
    assert torch.equal(runs["triton"][2], runs["torch"][2]) and torch.equal(runs["triton"][3], runs["torch"][3])


def test_greedy_through_the_triton_backend_matches_hf(tmp_path):
    d = build("llama", tmp_path / "m")
    prompts = [[3 + (7 * i) % (VOCAB - 3) for i in range(n)] for n in (1, 6, 17, 33)]
    new = 5
    expected = [hf_greedy(d, p, new) for p in prompts]
    llm = LLM(str(d), device=DEVICE, dtype="float32", chunk_size=24, attention="triton", max_num_seqs=4,
              num_blocks=64, check_invariants=True)
    runner = llm.executor.runner
    assert runner.attn.name == "triton" and runner.graphs is not None
    outs = llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0))
    assert [o.token_ids for o in outs] == expected
    assert sum(runner.graphs.steps.values()) >= 2  # pure-decode steps went through the static buffers
    assert llm.executor.blocks.num_free == llm.executor.blocks.num_blocks

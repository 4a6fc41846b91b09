"""`DecodeGraphs`' padding and static-buffer logic, run in its eager mode (the captured region
called directly): a padded step gives the logits of the unpadded eager step and writes the
same KV, buffers are reused, sizes are chosen from the ladder, and a step past the largest
size runs eagerly. On CUDA (tools/gpu_check.sh) the same checks replay captured graphs."""

from __future__ import annotations

import pytest
import torch

from tests.engine.tiny_models import build
from tests.triton.conftest import DEVICE, HAS_CUDA

pytestmark = pytest.mark.triton
pytest.importorskip("triton")

from tetri.workers.graph_runner import capture_sizes  # noqa: E402
from tetri.workers.kv_pool import KVPool, PoolLayout  # noqa: E402
from tetri.workers.model_runner import ModelRunner, Segment  # noqa: E402
from tetri.workers.models.loader import load_model  # noqa: E402

LENGTHS = [3, 16, 17, 30, 1, 9, 31, 5, 12]  # nine prompts: one more than the largest size (8)
BS = 16


def test_capture_sizes_ladder():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))


@pytest.fixture(scope="module")
def primed(tmp_path_factory):
    """A runner with static decode (max 8 rows) over a pool holding nine prefilled prompts."""
    loaded = load_model(str(build("llama", tmp_path_factory.mktemp("m"))), "float32", DEVICE)
    layout = PoolLayout.for_model(loaded.spec, 40, BS, torch.float32)
    runner = ModelRunner(loaded, KVPool.allocate(layout, DEVICE), DEVICE, "triton")
    runner.use_static_decode(max_num_seqs=8, max_model_len=128, capture=HAS_CUDA)
    tables, free = [], list(range(39, -1, -1))
    for n in LENGTHS:
        tables.append([free.pop() for _ in range(-(-(n + 16) // BS))])
    prompts = [Segment([3 + (i * 5 + j) % 300 for j in range(n)], 0, t, False) for i, (n, t) in
               enumerate(zip(LENGTHS, tables))]
    runner.run(prompts)
    return runner, tables


def _decodes(rows: list[int], step: int, tables) -> list[Segment]:
    return [Segment([7 + r + step], LENGTHS[r] + step, tables[r], True) for r in rows]


def _both(runner, segments):
    """(eager logits, pool after it, static logits, pool after it): the static step rewrites
    the same K/V at the same slots, so the pools must be bit-equal."""
    eager = runner.model.compute_logits(runner._run_eager(segments))
    pool_eager = runner.pool.data.clone()
    static = runner.run(segments)
    return eager, pool_eager, static, runner.pool.data.clone()


def test_padded_steps_match_unpadded_eager_steps_and_write_nothing_else(primed):
    runner, tables = primed
    graphs = runner.graphs
    before = dict(graphs.steps)
    for step, rows in enumerate([[0, 1, 2, 3, 4], [8], [5, 6], [5, 6, 7]]):  # sizes 8, 1, 2, 4
        eager, pool_eager, static, pool_static = _both(runner, _decodes(rows, step, tables))
        torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)
        assert torch.equal(static.argmax(-1), eager.argmax(-1))
        assert torch.equal(pool_static, pool_eager)  # padding rows (stale tables of larger steps) wrote nothing
    got = {size: graphs.steps.get(size, 0) - before.get(size, 0) for size in graphs.sizes}
    assert got == {1: 1, 2: 1, 4: 1, 8: 1}
    assert graphs.context_lens[3].item() == 0 and graphs.slots[3].item() == -1  # the last step's padding row


def test_buffers_are_reused_and_past_the_largest_size_runs_eagerly(primed):
    runner, tables = primed
    graphs = runner.graphs
    ptrs = (graphs.id_pos.data_ptr(), graphs.tables.data_ptr(), graphs.hidden.data_ptr())
    runner.run(_decodes([0, 1, 2], 10, tables))
    grows = graphs.staging.grows
    steps = dict(graphs.steps)
    assert graphs.size_for(9) is None and graphs.size_for(3) == 4 and graphs.size_for(8) == 8
    nine = _decodes(list(range(9)), 11, tables)
    eager = runner.model.compute_logits(runner._run_eager(nine))
    routed = runner.run(nine)  # past the largest size: the eager path
    assert graphs.steps == steps
    torch.testing.assert_close(routed, eager, atol=0, rtol=0)
    for step in range(12, 15):
        runner.run(_decodes([0, 3, 5, 6, 8], step, tables))
    assert graphs.steps[8] == steps.get(8, 0) + 3
    assert (graphs.id_pos.data_ptr(), graphs.tables.data_ptr(), graphs.hidden.data_ptr()) == ptrs
    assert graphs.staging.grows == grows  # the pinned staging buffer is reused

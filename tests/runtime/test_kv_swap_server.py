"""`--swap-space` on a real `tetri-serve` (issue 19 item 5): a decode pool of 10 blocks that
six requests sent at once (4 blocks each at the end; any three overlapping overflow it) make
the decode worker preempt.
With `--preemption-mode swap` every request completes, the greedy outputs equal those of a
second server that recomputes and of the same requests served one at a time (unpreempted),
the swap counters moved in `/workers` and `/metrics`, and nothing leaks: the board's free
blocks are back to the total and the host pool holds nothing. The heartbeat timeout is long
so a loaded machine never turns a slow worker into a dead one mid-test."""

import concurrent.futures as cf
import random
import re
import threading

import pytest

from tests.runtime.server_proc import ServerProc

BLOCK_BYTES = 16 * 1024  # one 16-token block of the embedded default model
KV_GIB = 10.5 * BLOCK_BYTES / 2**30  # -> 10 blocks per worker (max_model_len 160)
SWAP_GIB = 40 * BLOCK_BYTES / 2**30
MAX_TOKENS = 40
rng = random.Random(5)
PROMPTS = [[rng.randrange(5, 400) for _ in range(n)] for n in (20, 23, 17, 26, 19, 22)]  # + 40: 4 blocks each


def _server(mode: str) -> ServerProc:
    return ServerProc("--device", "cpu", "--prefill", "1", "--decode", "1", "--kv-cache-gb", f"{KV_GIB:.12f}",
                      "--swap-space", f"{SWAP_GIB:.12f}", "--preemption-mode", mode, "--chunk-size", "32",
                      "--heartbeat-timeout-s", "600")


@pytest.fixture(scope="module")
def servers(default_model_dir):
    swap, recompute = _server("swap"), _server("recompute")
    try:
        with cf.ThreadPoolExecutor(2) as pool:  # both load at once
            list(pool.map(ServerProc.start, (swap, recompute)))
        yield swap, recompute
    finally:
        with cf.ThreadPoolExecutor(2) as pool:  # and stop at once
            list(pool.map(ServerProc.stop, (swap, recompute)))


def _complete(srv: ServerProc, prompt: list[int], start: threading.Barrier | None = None) -> list[int]:
    client = srv.openai(timeout=300)
    model = client.models.list().data[0].id
    if start is not None:
        start.wait()  # every request of the burst is sent together
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].finish_reason == "length"
    return out.choices[0].model_extra["token_ids"]


def _burst(srv: ServerProc) -> list[list[int]]:
    start = threading.Barrier(len(PROMPTS), timeout=60)
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: _complete(srv, p, start), PROMPTS))


def _decode_row(srv: ServerProc) -> dict:
    return next(w for w in srv.workers() if w["role"] == "decode")


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(rf'{re.escape(name)}\{{([^}}]*)\}} (\S+)$', line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


def test_swapped_requests_complete_and_equal_recomputed_and_unpreempted_ones(servers):
    swap, recompute = servers
    assert _decode_row(swap)["preemptions_swap"] == _decode_row(swap)["kv_swapped_out_blocks"] == 0
    with cf.ThreadPoolExecutor(2) as pool:  # both bursts at once, as two clients would
        swapped, recomputed = pool.map(_burst, (swap, recompute))
    row = _decode_row(swap)
    assert row["preemptions_swap"] > 0 and row["preemptions_recompute"] == 0, row
    assert row["kv_swapped_out_blocks"] == row["kv_swapped_in_blocks"] > 0, row
    other = _decode_row(recompute)
    assert other["preemptions_recompute"] > 0 and other["preemptions_swap"] == 0, other
    assert other["kv_swapped_out_blocks"] == 0, other
    assert swapped == recomputed
    alone = [_complete(swap, p) for p in PROMPTS]  # one at a time: 4 of 10 blocks, never preempted
    assert _decode_row(swap)["preemptions_swap"] == row["preemptions_swap"]
    assert swapped == alone


def test_swap_counters_are_in_metrics_and_nothing_leaks(servers):
    swap, _ = servers
    assert swap.wait_idle(30), swap.workers()
    row = _decode_row(swap)
    assert row["kv_blocks_used"] == 0 and row["swapped_reqs"] == 0 and row["swap_held_blocks"] == 0, row
    status, text = swap.get("/metrics")
    assert status == 200
    labels = dict(worker=str(row["worker_id"]), role="decode")
    assert _metric(text, "tetri:num_preemptions_total", **labels, mode="swap") == row["preemptions_swap"] > 0
    assert _metric(text, "tetri:num_preemptions_total", **labels, mode="recompute") == 0
    assert _metric(text, "tetri:kv_swapped_out_blocks_total", **labels) == row["kv_swapped_out_blocks"] > 0
    assert _metric(text, "tetri:kv_swapped_in_blocks_total", **labels) == row["kv_swapped_in_blocks"]
    assert _metric(text, "tetri:num_requests_swapped", **labels) == 0
    assert _metric(text, "tetri:kv_swap_held_blocks", **labels) == 0

"""KV handoff bandwidth and per-handoff latency on CPU, against a plain tensor copy.

Two pools in separate shared-memory segments (as a prefill and a decode worker have), laid
out for the ~100M bench Llama (12 layers, 12 KV heads x 64, fp32, block 16: 72 KiB/token).
For each prompt length: the real `KVPool.copy_blocks_from` with block ids from the real
allocator (runs of consecutive ids: few large copies), the same with every block scattered
(worst case: one copy per block), and `dst.copy_(src)` of the same bytes in one piece.
Per-handoff latency adds the control messages a handoff costs (Handoff front->decode,
KVCopied decode->front, Release front->prefill) over real ZeroMQ ipc:// sockets.

    python tools/bench_handoff.py [--lengths 128 512 2048 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch
import zmq

from tetri.protocol import Handoff, KVCopied, Release, encode, from_worker_decoder, to_worker_decoder
from tetri.sched.kv_blocks import BlockAllocator, blocks_for_tokens
from tetri.types import SamplingParams
from tetri.workers.kv_pool import KVPool, PoolLayout


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def message_round_trip_s(num_blocks: int, prompt_tokens: int, repeats: int) -> float:
    """Handoff + KVCopied + Release through ipc:// PUSH/PULL with msgspec encode/decode."""
    ctx = zmq.Context()
    d = tempfile.mkdtemp(prefix="tetri-bench-")
    a_in, b_in = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    a_in.bind(f"ipc://{d}/a")
    b_in.bind(f"ipc://{d}/b")
    to_b, to_a = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
    to_b.connect(f"ipc://{d}/b")
    to_a.connect(f"ipc://{d}/a")
    msg = Handoff(req_id="r", src_worker=0, block_ids=list(range(num_blocks)), prompt_token_ids=list(range(prompt_tokens)),
                  params=SamplingParams(max_tokens=128), first_tokens=[1], open_choices=[0])

    def once():
        to_b.send(encode(msg))
        to_worker_decoder.decode(b_in.recv())
        to_a.send(encode(KVCopied(worker_id=1, req_id="r", num_bytes=1, seconds=0.0)))
        from_worker_decoder.decode(a_in.recv())
        to_b.send(encode(Release(req_id="r")))
        to_worker_decoder.decode(b_in.recv())

    t = best_of(once, repeats * 4)
    for s in (a_in, b_in, to_a, to_b):
        s.close(0)
    ctx.term()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bs = 16
    num_blocks = blocks_for_tokens(max(args.lengths), bs) * 2 + 8
    layout = PoolLayout(num_blocks, 12, bs, 12, 64, "float32")
    src, dst = KVPool.allocate(layout, shared=True), KVPool.allocate(layout, shared=True)
    src.data.normal_()
    print(f"KV per token: {layout.block_bytes // bs / 1024:.0f} KiB; pools in /dev/shm ({layout.nbytes / 2**30:.2f} GiB each)")
    print(f"{'tokens':>7} {'MB':>8} {'handoff GB/s':>13} {'scattered GB/s':>15} {'plain copy GB/s':>16} "
          f"{'ratio':>6} {'copy ms':>8} {'msgs ms':>8} {'latency ms':>11}")
    try:
        for n in args.lengths:
            k = blocks_for_tokens(n, bs)
            alloc_s, alloc_d = BlockAllocator(num_blocks, bs), BlockAllocator(num_blocks, bs)
            alloc_s.allocate("warm", 3)  # realistic: the ids do not start at 0
            s_ids, d_ids = alloc_s.allocate("r", k), alloc_d.allocate("r", k)
            scattered = random.Random(0).sample(range(num_blocks), 2 * k)
            nbytes = k * layout.block_bytes
            t_real = best_of(lambda: dst.copy_blocks_from(src, s_ids, d_ids), args.repeats)
            t_scat = best_of(lambda: dst.copy_blocks_from(src, scattered[:k], scattered[k:]), args.repeats)
            t_plain = best_of(lambda: dst.data[:k].copy_(src.data[:k]), args.repeats)
            t_msgs = message_round_trip_s(k, n, args.repeats)
            gbs = lambda t: nbytes / t / 1e9  # noqa: E731
            print(f"{n:>7} {nbytes / 1e6:>8.1f} {gbs(t_real):>13.2f} {gbs(t_scat):>15.2f} {gbs(t_plain):>16.2f} "
                  f"{t_real / t_plain:>5.2f}x {t_real * 1e3:>8.2f} {t_msgs * 1e3:>8.3f} {(t_real + t_msgs) * 1e3:>11.2f}")
    finally:
        src.close()
        dst.close()


if __name__ == "__main__":
    main()

"""KV handoff between two processes, per transfer path, against a raw copy of the same bytes.

    python tools/bench_kv_transfer.py                    # CPU: shm and host_staged, a small layout
    python tools/bench_kv_transfer.py --device cuda:0    # GPU: cuda_ipc and host_staged, the 8B layout

One process owns a pool (allocated and exported as a worker does); this one opens it once per
path (`kv_transfer.open_peer`, restricted to that path) and copies the blocks of one prompt of
each length into its own pool: the time is from the copy's start to its completion seen by the
host (what a decode worker waits before `KVCopied`); host_staged adds the owner's staging time
(device to the pinned mirror). The raw copy is the same bytes within this process (device to
device on a GPU), timed the same way. The 8B layout: 32 layers x 8 KV heads x 128, bf16, 16-token
blocks of 2 MiB. tools/gpu_serve_check.py runs it; on CPU its smoke mode does.
"""

from __future__ import annotations

import argparse
import time

LAYOUT_8B = (0, 32, 16, 8, 128, "bfloat16")
LAYOUT_SMALL = (0, 2, 16, 2, 32, "float32")


def _owner(conn, layout_args, device) -> None:
    """The pool's owner (a child process): allocate, fill, answer stage requests with their time."""
    from tetri.protocol import encode
    from tetri.workers.kv_pool import KVPool, PoolLayout
    from tetri.workers.kv_stage import with_stage
    from tetri.workers.memory import bind_device
    from tetri.workers.node import pool_info

    bind_device(device)
    pool = with_stage(KVPool.allocate(PoolLayout(*layout_args), device, shared=True))
    pool.data.normal_()
    conn.send(encode(pool_info(pool)))
    while True:
        cmd = conn.recv()
        if cmd[0] == "stage":
            t0 = time.perf_counter()
            pool.stage.put(pool.data, cmd[1], cmd[2])
            conn.send(time.perf_counter() - t0)
        else:
            pool.close()
            conn.send("closed")
            return


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def bench_handoff(device: str, layout: tuple, lengths: list[int], repeats: int, paths: tuple[str, ...]) -> list[dict]:
    """One row per prompt length: raw_ms, and per path its ms, GB/s and ratio to the raw copy."""
    import multiprocessing as mp

    import msgspec
    import torch

    from tetri.protocol import PoolInfo
    from tetri.sched.kv_blocks import blocks_for_tokens
    from tetri.workers.kv_pool import KVPool, PoolLayout
    from tetri.workers.kv_stage import stamp_of
    from tetri.workers.kv_transfer import LocalEnd, open_peer

    most = blocks_for_tokens(max(lengths), 16)
    layout_args = (most + 8, *layout[1:])
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    owner = ctx.Process(target=_owner, args=(child, layout_args, device), daemon=True)
    owner.start()
    rows = []
    try:
        info = msgspec.msgpack.decode(conn.recv(), type=PoolInfo)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dst = KVPool.allocate(PoolLayout(*layout_args), device)
        raw_src = torch.empty_like(dst.data).normal_()
        sources = {p: open_peer(info, LocalEnd(1, device), allowed=(p,)) for p in paths}
        for n in lengths:
            k = blocks_for_tokens(n, 16)
            src_ids, dst_ids = list(range(3, 3 + k)), list(range(k))
            nbytes = k * dst.layout.block_bytes
            row = dict(tokens=n, MB=nbytes / 1e6)

            def raw():
                t0 = time.perf_counter()
                dst.data[:k].copy_(raw_src[3:3 + k])
                _sync(device)
                return time.perf_counter() - t0

            row["raw_ms"] = _median([raw() for _ in range(repeats + 1)][1:]) * 1e3
            for path, src in sources.items():
                if src.path != path:
                    row[f"{path}_error"] = src.error
                    continue
                times = []
                for rep in range(repeats + 1):
                    stage_s = 0.0
                    stamp = stamp_of(f"bench-{n}-{rep}", n)
                    if path == "host_staged":
                        conn.send(("stage", src_ids, stamp))
                        stage_s = conn.recv()
                    t0 = time.perf_counter()
                    src.copy_into(dst, src_ids, dst_ids).wait()
                    times.append(stage_s + time.perf_counter() - t0)
                t = _median(times[1:])
                row[f"{path}_ms"] = t * 1e3
                row[f"{path}_GBps"] = nbytes / t / 1e9
                row[f"{path}_vs_raw"] = t / (row["raw_ms"] / 1e3)
            row["raw_GBps"] = nbytes / (row["raw_ms"] / 1e3) / 1e9
            rows.append(row)
        for src in sources.values():
            src.close()
        del dst, raw_src
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the servers that follow size their pools from the device's total
    finally:
        conn.send(("close",))
        conn.poll(30) and conn.recv()
        owner.join(30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    rows = bench_handoff(args.device, LAYOUT_8B if gpu else LAYOUT_SMALL, args.lengths, args.repeats,
                         ("cuda_ipc", "host_staged") if gpu else ("shm", "host_staged"))
    for row in rows:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.bench_kv_transfer import main as _main  # by module name: its child process imports it

    _main()

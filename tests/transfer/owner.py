"""A real process that owns a shared KV pool, for the transfer tests (spawned, never forked).

Commands over a pipe: ("info",) -> PoolInfo (msgpack bytes); ("fill", ids, value) writes `value`
into those blocks; ("stage", ids, stamp) stages them into the mirror; ("corrupt",) overwrites the
canary; ("close",) closes the pool (unlinking it) and exits. `device` may be a CUDA device (the
`gpu` tests), and `alloc_conf` the PYTORCH_CUDA_ALLOC_CONF the owner runs with.
"""

from __future__ import annotations

LAYOUT_ARGS = (32, 2, 16, 2, 32, "float32")  # the embedded default model's block layout, 32 blocks


def serve(conn, device: str = "cpu", alloc_conf: str | None = None) -> None:
    import os

    if alloc_conf is not None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf  # before torch is imported
    import torch

    from tetri.protocol import encode
    from tetri.workers.kv_pool import CANARY_BYTES, KVPool, PoolLayout
    from tetri.workers.kv_stage import with_stage
    from tetri.workers.memory import bind_device
    from tetri.workers.node import pool_info

    bind_device(device)
    pool = with_stage(KVPool.allocate(PoolLayout(*LAYOUT_ARGS), device, shared=True))
    while True:
        cmd = conn.recv()
        if cmd[0] == "info":
            conn.send(encode(pool_info(pool)))
        elif cmd[0] == "fill":
            for b in cmd[1]:
                pool.data[b].fill_(cmd[2])
            conn.send("ok")
        elif cmd[0] == "corrupt":
            pool.whole.view(torch.uint8)[-CANARY_BYTES:].zero_()
            conn.send("ok")
        elif cmd[0] == "stage":
            pool.stage.put(pool.data, cmd[1], cmd[2])
            conn.send("ok")
        elif cmd[0] == "close":
            pool.close()
            conn.send("ok")
            return


class Owner:
    def __init__(self, device: str = "cpu", alloc_conf: str | None = None) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, device, alloc_conf), daemon=True)
        self.proc.start()

    def ask(self, *cmd):
        self.conn.send(cmd)
        if not self.conn.poll(60):
            raise TimeoutError(f"pool owner did not answer {cmd[0]}")
        return self.conn.recv()

    def info(self):
        import msgspec

        from tetri.protocol import PoolInfo

        return msgspec.msgpack.decode(self.ask("info"), type=PoolInfo)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.ask("close")
            except (OSError, EOFError, TimeoutError):
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def receive(conn, info_msg: bytes, worker_id: int) -> None:
    """A peer that opens the pool host-staged (its flag set in the owner's mirror) and copies its
    blocks 0..3 out in a loop until killed (the test SIGKILLs it mid-copy)."""
    import msgspec

    from tetri.protocol import PoolInfo
    from tetri.workers.kv_pool import KVPool
    from tetri.workers.kv_transfer import LocalEnd, layout_of, open_peer

    info = msgspec.msgpack.decode(info_msg, type=PoolInfo)
    src = open_peer(info, LocalEnd(worker_id), allowed=("host_staged",))
    dst = KVPool.allocate(layout_of(info))
    conn.send(src.path)
    copies = 0
    while True:
        src.copy_into(dst, [0, 1, 2, 3], [0, 1, 2, 3])
        copies += 1
        if copies == 1:
            conn.send("copying")


def start_receiver(info_msg: bytes, worker_id: int):
    """(process, first message: the path it opened) for `receive`, spawned."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=receive, args=(child, info_msg, worker_id), daemon=True)
    proc.start()
    return proc, conn

"""The KV swap's copies and their ordering (issue 19 item 5): GPU pool <-> host pool.

A preempted sequence's KV goes to host blocks it holds (`BlockAllocator.begin_swap_out`) and
comes back into fresh pool blocks (`begin_swap_in`). The copies run through a `SwapCopier`:

    CPU    the copy runs at once (`kv_transfer.SyncCopier`); its completion is done on return
    CUDA   one `copy_` per run of consecutive block ids on a dedicated copy stream (the
           `kv_transfer.StreamCopier` of handoffs), after the work already queued on the
           worker's stream (the forward that wrote the KV; earlier writers of the destination),
           between two timing events; the host pool is pinned (`HostPool`), so the copies are DMA

The ordering, the same on both devices: a swap-out's pool blocks are freed at once (the
preemption needs them this step), and the worker's stream is made to wait for the copy's event
(`order_compute`) before anything it queues later can overwrite them; the host never waits.
`SwapTable` keeps each copy until the host has seen it complete: a swapped-out sequence is not
swapped back in before that; a swap-in's sequence re-joins the batch, and its host blocks are
freed, only once the host has seen the upload complete (like a handoff's copy, its pool blocks
are held meanwhile); an abort of a sequence whose copy is in flight waits for that copy before
its blocks are freed. On CPU every copy is complete when it returns, so a preempted sequence
is swapped out, and a resumed one swapped in, within the step. The CUDA path (the copy
stream, its events, the pinned host pool) has never run on a GPU: none is lent to us.
Copy seconds come from the completion (perf_counter on CPU, the events' elapsed time on CUDA)
and feed the `CostMeter` that picks swap or recompute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tetri.workers.kv_transfer import Done, EventDone, StreamCopier, make_copier


class SwapCopy:
    """One swap copy: `done()` once the host has seen it complete, `wait()` blocks until then,
    `seconds()` what it took (valid once done), `order_compute()` makes the worker's later
    device work wait for it (without blocking the host)."""

    def __init__(self, completion, num_blocks: int, seconds_fn, order_fn=None) -> None:
        self.completion = completion
        self.num_blocks = num_blocks
        self._seconds_fn = seconds_fn
        self._order_fn = order_fn

    def done(self) -> bool:
        return self.completion.done()

    def wait(self) -> None:
        self.completion.wait()

    def seconds(self) -> float:
        return self._seconds_fn()

    def order_compute(self) -> None:
        if self._order_fn is not None:
            self._order_fn()


class SwapCopier:
    """Copies between a worker's pool and its `HostPool` (see the module docstring)."""

    def __init__(self, host_pool, device: str) -> None:
        self.host = host_pool
        self.copier = make_copier(device)

    def copy(self, src_ids: list[int], dst_ids: list[int], to_host: bool) -> SwapCopy:
        gpu, host = self.host.gpu.data, self.host.data
        dst, src = (host, gpu) if to_host else (gpu, host)
        if not isinstance(self.copier, StreamCopier):
            start = time.perf_counter()
            self.copier.copy(dst, src, src_ids, dst_ids)
            seconds = time.perf_counter() - start
            return SwapCopy(Done(), len(src_ids), lambda: seconds)
        stream = self.copier.stream  # never run on a GPU (none is lent to us)
        stream.wait_stream(torch.cuda.current_stream(self.copier.device))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        self.copier.copy(dst, src, src_ids, dst_ids)  # on `stream`, after the worker's queued work
        end.record(stream)
        current = torch.cuda.current_stream(self.copier.device)
        return SwapCopy(EventDone(end), len(src_ids), lambda: begin.elapsed_time(end) / 1e3,
                        lambda: current.wait_event(end))


@dataclass
class _InFlight:
    seq: object
    copy: SwapCopy
    to_host: bool


class SwapTable:
    """Swap copies in flight, by sequence key, and what to do once each completed. `land`
    finishes the completed ones through `finish(seq, to_host, copy)` (the caller frees the pool
    blocks of a swap-out, or the host blocks of a swap-in and re-joins the sequence); `settle`
    waits for one sequence's copy (an abort) and finishes it the same way."""

    def __init__(self, finish) -> None:
        self._by_key: dict[str, _InFlight] = {}
        self._finish = finish

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def add(self, seq, copy: SwapCopy, to_host: bool) -> None:
        """Track `seq`'s copy; one that is already complete (every CPU copy) is finished now."""
        if copy.done():
            self._finish(seq, to_host, copy)
        else:
            self._by_key[seq.key] = _InFlight(seq, copy, to_host)

    def land(self, wait_oldest: bool = False) -> int:
        """Finish the copies the host has seen complete (start order); `wait_oldest`: with
        nothing else to run, block on the oldest copy first instead of spinning. Returns how many."""
        if wait_oldest and self._by_key:
            next(iter(self._by_key.values())).copy.wait()
        done = [k for k, f in self._by_key.items() if f.copy.done()]
        for key in done:
            f = self._by_key.pop(key)
            self._finish(f.seq, f.to_host, f.copy)
        return len(done)

    def settle(self, key: str) -> bool:
        """Wait for `key`'s copy in flight (if any) and finish it; True if there was one."""
        f = self._by_key.pop(key, None)
        if f is None:
            return False
        f.copy.wait()
        self._finish(f.seq, f.to_host, f.copy)
        return True


def swap_out(ex, seq, swapped: dict, copies: SwapTable) -> bool:
    """Start swapping `seq` out of `ex`'s pool (the decode and mixed cores' preemption): its
    blocks are free at once, later device work ordered after the copy; `seq` joins `swapped`
    and its copy `copies`. False when the host tier could not take it (then nothing changed)."""
    copy = ex.start_swap_out(seq)
    if copy is None:
        return False
    copy.order_compute()  # later device work waits for the copy: its blocks are freed now
    ex.finish_swap_out(seq)
    swapped[seq.key] = seq
    copies.add(seq, copy, to_host=True)
    return True


def swap_board_fields(core, blocks) -> dict:
    """The KV swap's load-board fields of a worker (zeros for a core that never swaps)."""
    swapped = getattr(core, "swapped", {})
    return dict(kv_swapped_out_blocks=blocks.swapped_out_blocks, kv_swapped_in_blocks=blocks.swapped_in_blocks,
                preemptions_swap=getattr(core, "swaps", 0), preemptions_recompute=getattr(core, "recomputes", 0),
                swapped_reqs=len(swapped), swap_held_blocks=blocks.host.num_held if blocks.host is not None else 0)

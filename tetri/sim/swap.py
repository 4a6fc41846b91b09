"""The decode side's KV swap in the simulator (issue 19 item 5), as `tetri.workers.decode` does it.

A preempted request's KV goes to the worker's host blocks (`--swap-space`, the same
`BlockAllocator.swap_out` bookkeeping) when `tetri.sched.swap.choose_preemption` finds the
two copies cheaper than the re-prefill, else it is recomputed as before. The costs are the
cost model's (what the real worker measures): the PCIe copy of the request's blocks, both
ways, against the prefill step of its KV tokens. The copies' seconds go into the step that
asks for them (`SimWorker.take_host_copy_s`: serialized with the step, as tetri-serve runs
them on one stream). Swapped requests come back, oldest first, as soon as their blocks fit.
"""

from __future__ import annotations

from tetri.sched.swap import choose_preemption
from tetri.sim.costmodel import piece_shape
from tetri.sim.requests import SimRequest


class SimSwap:
    def __init__(self, worker, mode: str = "auto") -> None:
        self.w = worker
        self.mode = mode
        self.swapped: dict[str, SimRequest] = {}
        self.swaps = 0
        self.recomputes = 0

    def out(self, req: SimRequest) -> bool:
        """Swap `req` (just preempted, still holding its blocks) out if that is cheaper; True
        when its KV went to the host (its GPU blocks are freed), False to recompute it."""
        w, bs = self.w, self.w.env.block_size
        blocks = w.blocks
        n = len(blocks.blocks_of(req.req_id))
        tokens = req.kv_tokens
        fits = blocks.can_swap_out(req.req_id)
        copy_s = w.env.cost.host_copy_s(n * bs) / n if n else None
        prefill_s = w.env.cost.step_s(piece_shape(tokens, 0, sample=False)) / tokens if tokens > 0 else None
        if not fits or choose_preemption(n, tokens, copy_s, prefill_s, fits, self.mode) != "swap":
            self.recomputes += 1
            return False
        blocks.swap_out(req.req_id)
        w.held_blocks.pop(req.req_id, None)
        self.swapped[req.req_id] = req
        self.swaps += 1
        return True

    def resume(self, running: dict[str, SimRequest]) -> int:
        """Upload swapped requests, oldest first, while their blocks fit; they join `running`.
        Returns how many came back."""
        w, back = self.w, 0
        for req_id, req in list(self.swapped.items()):
            n = w.blocks.swapped_blocks(req_id)
            if n > w.blocks.num_free:
                break
            w.blocks.swap_in(req_id)
            w.held_blocks[req_id] = n
            del self.swapped[req_id]
            running[req_id] = req
            back += 1
        return back


def swap_stats(workers) -> dict[str, int]:
    """The run's swap counters over the decode sides (empty without a swap space)."""
    sides = [w.decode.swap for w in workers if hasattr(w, "decode") and w.blocks.host is not None and w.role == "decode"]
    if not sides:
        return {}
    return {"swaps": sum(s.swaps for s in sides), "swap_recomputes": sum(s.recomputes for s in sides)}

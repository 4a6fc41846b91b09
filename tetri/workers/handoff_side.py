"""The workers' side of the KV handoff protocol, in one place (the front's side is
`tetri.sched.handoff`):

  prefill worker (`HeldPrompts`): a prompt whose last piece ran keeps its blocks, held until
    the front's `Release` (a decode worker copied its KV, or the request was abandoned) or
    an `Abort`;
  decode worker (`HandoffIntake`): a `Handoff` waits for admission (the local decode policy
    picks those that fit); its KV is copied in from the prefill worker's pool (one copy per
    open choice, on the peer pair's transfer path; prompt blocks this worker caches are
    attached instead) and acked with `KVCopied` once the host saw the copy complete (the
    sequences then join the batch); an `Abort` of a request whose copy is in flight waits for
    the copy before its destination blocks are freed, and `Dropped` tells the front the
    worker holds and reads nothing of it any more (`decode_abort`).

`workers/prefill.py`, `workers/decode.py` and `workers/node.py` call these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tetri.protocol import Abort, Dropped, Handoff, KVCopied, WorkerError
from tetri.sched.decode_policy import DecodeReqView
from tetri.sched.kv_blocks import blocks_for_tokens
from tetri.sched.prefix_hash import block_hashes
from tetri.workers.kv_stage import block_stamps
from tetri.workers.kv_transfer import Done, InflightCopies, InflightCopy, PeerSource, as_source
from tetri.workers.seq import Seq


class HeldPrompts:
    """The prefill worker's prompts prefilled and held (their blocks kept) until Release."""

    def __init__(self, executor) -> None:
        self.ex = executor
        self.held: set[str] = set()

    def hold(self, req_id: str) -> None:
        """The prompt's last piece ran: its blocks stay until the front lets go."""
        self.held.add(req_id)

    def release(self, req_id: str, seqs: list[Seq] | None) -> None:
        """`Release` or `Abort`: free the prompt's blocks (choice 0 owns them); a request this
        worker no longer knows (an Abort freed it first) is a no-op."""
        self.held.discard(req_id)
        if seqs:
            self.ex.free(seqs[0])


@dataclass
class _Waiting:
    msg: Handoff
    arrival_s: float


class HandoffIntake:
    """The decode worker's handoffs: waiting for admission (`waiting`), being copied in
    (`copies`), and the peer pools they are copied from (`peers`)."""

    def __init__(self, executor, worker_id: int) -> None:
        self.ex = executor
        self.worker_id = worker_id
        self.peers: dict[int, PeerSource] = {}
        self.copies = InflightCopies()  # handoffs whose KV is being copied in (not acked yet)
        self.waiting: dict[str, _Waiting] = {}
        self.handoff_blocks_copied = 0
        """Prompt blocks copied in from prefill workers (over every handoff and choice)."""
        self.handoff_blocks_cached = 0
        """Prompt blocks attached from this worker's prefix cache instead of copied."""

    def add_peer(self, worker_id: int, source) -> None:
        """A peer pool opened for copying (a `PeerSource`, or a pool of this process)."""
        if worker_id in self.peers:
            self.retire_peer(worker_id)
        self.peers[worker_id] = as_source(source, self.ex.device)

    def retire_peer(self, worker_id: int) -> None:
        """The peer is gone or has a new pool: drop the copies still reading the old one (their
        destination blocks are freed once each copy completed), then close the mapping."""
        for copy in self.copies.settle_from(worker_id):
            for seq in copy.seqs:
                self.ex.free(seq)
        source = self.peers.pop(worker_id, None)
        if source is not None:
            source.close()

    def handoff(self, msg: Handoff, now: float) -> None:
        self.waiting[msg.req_id] = _Waiting(msg, now)

    def drop(self, req_id: str, choice: int | None) -> bool:
        """An Abort's part here: the copy in flight settled (and its blocks freed), the waiting
        handoff forgotten; True when this worker knew the request."""
        known = self.settle_copy(req_id, choice)
        return (self.waiting.pop(req_id, None) is not None if choice is None else False) or known

    def admit(self, policy, running: list[DecodeReqView], now: float) -> list[WorkerError]:
        """The waiting handoffs the policy admits start copying in (a failed pair: its error)."""
        bs = self.ex.block_size
        views = []
        for req_id, w in self.waiting.items():
            m = w.msg
            # its choices' blocks (prompt + 1 token each) as one context the policy adds 1 to:
            # exactly the blocks `copy_in` takes (a whole-block context + 1 used to ask for one more)
            per_choice = blocks_for_tokens(len(m.prompt_token_ids) + 1, bs)
            views.append(DecodeReqView(req_id, per_choice * bs * len(m.open_choices) - 1, m.prior_output_tokens + 1,
                                       m.params.max_tokens, m.predicted_output_tokens, w.arrival_s, 0,
                                       priority=m.priority))
        admitted = policy.admit(views, running, self.ex.blocks.num_free, bs, now) if views else []
        return [ack for ack in (self.copy_in(self.waiting.pop(r).msg) for r in admitted) if ack]

    def copy_in(self, msg: Handoff) -> WorkerError | None:
        """Start copying a handoff's KV in (one copy per open choice, on the pair's transfer
        path); `landed` acks it once complete. The prompt's leading blocks this worker caches
        are attached instead (every choice shares them) and only the rest is copied. A pair
        with no path fails the request at once; one whose pool is short, or whose blocks the
        owner has not staged yet, retries later."""
        src = self.peers.get(msg.src_worker)
        bs = self.ex.block_size
        prompt_len = len(msg.prompt_token_ids)
        src_ids = msg.block_ids[: blocks_for_tokens(prompt_len, bs)]
        if src is not None and src.src is None:
            return WorkerError(worker_id=self.worker_id, req_id=msg.req_id,
                               message=f"no KV transfer path from worker {msg.src_worker} to worker "
                                       f"{self.worker_id}: {src.error}")
        hashes = block_hashes(msg.prompt_token_ids, bs, self.ex.hash_seed) if self.ex.blocks.caching else []
        cached = self.ex.blocks.match(hashes)  # no side effects: attached below, before any allocation
        k, n = len(cached), len(msg.open_choices)
        # attaching an unheld cached block takes it off the free count, like allocating one
        need = (blocks_for_tokens(prompt_len + 1, bs) - k) * n + k
        stamps = block_stamps(msg.req_id, msg.prompt_token_ids, bs, self.ex.hash_seed,
                              self.ex.blocks.caching)[k:] if src is not None and src.ready_fn is not None else []
        if src is None or need > self.ex.blocks.num_free or not src.ready(src_ids[k:], stamps):
            self.waiting[msg.req_id] = _Waiting(msg, time.monotonic())  # policy over-admitted, or not staged: retry
            return None
        start = time.perf_counter()
        seqs, completions = [], []
        for i, choice in enumerate(msg.open_choices):
            seq = Seq(msg.req_id, choice, msg.prompt_token_ids, msg.params, arrival_s=msg.arrival_s,
                      priority=msg.priority, prior_outputs=msg.prior_output_tokens)
            seq.output_ids.append(msg.first_tokens[choice])
            seq.num_computed = prompt_len
            seq.block_hashes = list(hashes)
            if i == 0:
                self.ex.blocks.lookup(seq.key, hashes[:k], prompt_len)  # counted once per request
            else:
                self.ex.blocks.attach(seq.key, cached)
            dst = self.ex.blocks.ensure_capacity(seq.key, prompt_len + 1)  # the blocks after the cached ones
            completions.append(src.copy_into(self.ex.pool, src_ids[k:], dst[: len(src_ids) - k]) if k < len(src_ids)
                               else Done())
            seqs.append(seq)
        self.handoff_blocks_copied += (len(src_ids) - k) * n
        self.handoff_blocks_cached += k * n
        self.copies.add(InflightCopy(msg.req_id, msg.src_worker, seqs, completions,
                                     (len(src_ids) - k) * self.ex.pool.layout.block_bytes * n, src.path, start))
        return None

    def landed(self, running: dict[str, Seq], idle: bool) -> list[KVCopied]:
        """Ack the copies the host has seen complete; their sequences join the batch. Decode steps
        never wait for a copy; with nothing else to run, wait for the oldest copy instead of
        spinning (it is already queued on the device: its own length bounds the wait). The landed
        sequences join `running`; `idle`: the caller has nothing else to run."""
        if self.copies and idle:
            self.copies.wait_oldest()
        acks = []
        for copy in self.copies.landed():
            for seq in copy.seqs:
                self.ex.commit_computed(seq)  # the prompt's full blocks: their KV is here now
                running[seq.key] = seq
            acks.append(KVCopied(worker_id=self.worker_id, req_id=copy.req_id, num_bytes=copy.num_bytes,
                                 seconds=time.perf_counter() - copy.start_s, path=copy.path))
        return acks

    def settle_copy(self, req_id: str, choice: int | None) -> bool:
        """An Abort of a request whose copy is in flight: wait for the copy, then free the blocks
        it wrote (of one choice, or all); the other choices are acked at the next step."""
        copy = self.copies.settle(req_id)
        if copy is None:
            return False
        keep = []
        for seq in copy.seqs:
            if choice is None or seq.choice == choice:
                self.ex.free(seq)
            else:
                keep.append(seq)
        if keep:
            copy.seqs = keep
            self.copies.add(copy)
        return True


def decode_abort(core, worker_id: int, msg: Abort) -> list:
    """A decode worker's Abort: drop the request (or one choice); a whole request is answered
    with `Dropped` (nothing of it is held or read here any more: a copy in flight was waited for)."""
    core.abort(msg.req_id, msg.choice)
    return [Dropped(worker_id=worker_id, req_id=msg.req_id)] if msg.choice is None else []

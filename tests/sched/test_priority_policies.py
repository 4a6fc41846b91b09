"""`priority` (vLLM's semantics: lower first) in the pure policies: the chunk packer's queue
and every decode admission policy. With one priority everywhere nothing changes."""

from tetri.sched.chunking import ChunkPacker
from tetri.sched.decode_policy import DecodeReqView
from tetri.sched.decode_registry import make_decode_policy


def _order(packer: ChunkPacker) -> list[str]:
    out = []
    while len(packer):
        out.extend(p.req_id for p in packer.next_chunk() if p.is_last)
    return out


def test_packer_serves_lower_priority_values_first_fcfs_within_one():
    packer = ChunkPacker(10, "fcfs", sched_batch=16)
    for req_id, prio in [("a", 0), ("b", 5), ("c", 0), ("d", -1), ("e", 5)]:
        packer.add(req_id, 10, priority=prio)
    assert _order(packer) == ["d", "a", "c", "b", "e"]


def test_a_better_priority_overtakes_scheduled_prompts_that_have_not_started():
    packer = ChunkPacker(10, "fcfs", sched_batch=16)
    for req_id in "abc":
        packer.add(req_id, 25)
    first = packer.next_chunk()  # a[0:10]: a has started, b and c are scheduled behind it
    assert [p.req_id for p in first] == ["a"]
    packer.add("urgent", 5, priority=-3)
    assert _order(packer) == ["a", "urgent", "b", "c"]  # never ahead of a started prompt


def test_sjf_groups_sort_by_priority_first():
    packer = ChunkPacker(100, "sjf", sched_batch=16)
    packer.add("long-urgent", 90, priority=-1)
    packer.add("short", 10)
    packer.add("mid", 50)
    assert _order(packer) == ["long-urgent", "short", "mid"]


def test_equal_priorities_keep_the_policy_order():
    a, b = ChunkPacker(8, "ljf", 2), ChunkPacker(8, "ljf", 2)
    for i, n in enumerate([3, 9, 4, 7, 12]):
        a.add(f"r{i}", n)
        b.add(f"r{i}", n, priority=2)
    assert _order(a) == _order(b) == ["r1", "r0", "r3", "r2", "r4"]


def _view(req_id, prio, context=20, held=0, arrival=0.0):
    return DecodeReqView(req_id, context, 1, 100, None, arrival, held, priority=prio)


def test_every_decode_policy_admits_by_priority():
    waiting = [_view("low", 3, arrival=0.0), _view("high", -1, arrival=1.0), _view("mid", 0, arrival=2.0)]
    for name in ("greedy", "reserve-static", "reserve-dynamic", "mlfq"):
        policy = make_decode_policy(name)
        # room for two of them (2 blocks each): the two best priorities, best first
        assert policy.admit(waiting, [], 4, 16, 0.0) == ["high", "mid"], name


def test_greedy_and_mlfq_preempt_the_worst_priority_first():
    running = [_view("low", 5, context=32, held=2), _view("high", -2, context=32, held=2)]
    for name in ("greedy", "mlfq"):
        run, preempt = make_decode_policy(name).schedule(running, 8, 1, 16, 0.0)  # one block for two growths
        assert (run, preempt) == (["high"], ["low"]), name

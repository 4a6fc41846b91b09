"""`priority` on the real engine (issue 20, item 8): real nodes, pools and model, the real
front scheduler and protocol. (The real server's prefill queue: test_tiny_pool_server.py.)"""

from tests.runtime.inproc import Cluster
from tetri.sched.front import ReqState


def _rounds_until(c: Cluster, done, limit=60):
    for _ in range(limit):
        if done():
            return
        c.round()
    raise AssertionError("condition not reached")


def test_decode_admission_takes_the_better_priority_first(default_model_dir):
    c = Cluster(default_model_dir, decode_blocks=4)  # the decode pool holds 64 tokens
    c.submit("hog", list(range(10, 40)), max_tokens=30)  # 30 + 30 tokens: the pool, while it runs
    _rounds_until(c, lambda: c.front.reqs["hog"].state is ReqState.DECODING)
    c.submit("low", list(range(40, 80)), max_tokens=2, priority=5)  # 41 tokens: 3 blocks
    _rounds_until(c, lambda: "low" in c.nodes[1].core.waiting)
    c.submit("urgent", list(range(80, 120)), max_tokens=2, priority=-1)  # 3 blocks: one of the two fits
    _rounds_until(c, lambda: "urgent" in c.nodes[1].core.waiting)
    assert c.front.reqs["hog"].state is ReqState.DECODING  # both arrived while the hog held the pool
    admitted = []  # in the order the decode worker took them in
    for _ in range(60):
        c.round()
        admitted += [r for r in ("low", "urgent") if r not in admitted and (c.tokens[r][1:] or r in c.finished)]
        if len(admitted) == 2:
            break
    assert admitted == ["urgent", "low"]
    c.run()
    assert c.finished == {"hog": "length", "low": "length", "urgent": "length"}
    assert c.blocks_used() == {0: 0, 1: 0}

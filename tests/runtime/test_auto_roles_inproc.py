"""--mode auto's flips on real nodes (real model, real pools, the real front and FlipPlan), in
one process so the test picks the moment: an in-place flip to mixed while the worker holds
queued chunks, prefilled prompts awaiting their copy, or running decodes; a drain out of
mixed; mixed workers taking handoffs. No request may be lost, leaked or changed: every one
finishes with the greedy tokens of a run without flips, and every pool ends empty."""

from __future__ import annotations

import random

import pytest

from tests.runtime.inproc import Cluster
from tetri.sched.flip import FlipDecision
from tetri.sched.roles import RolePolicy


class Scripted(RolePolicy):
    """The real RolePolicy type (so the front runs in adaptive mode) deciding what the test says."""

    def __init__(self) -> None:
        super().__init__(mixed_hands_off=False)
        self.queue: list[FlipDecision] = []

    def decide(self, loads, now):
        if self.queue and not any(w.state == "draining" for w in loads):
            return self.queue.pop(0)
        return None


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(20, 60))] for _ in range(n)]


MAX_TOKENS = 8
BATCHES = {"r": prompts(6), "s": prompts(2, seed=1), "t": prompts(5, seed=2), "u": prompts(4, seed=3),
           "v": prompts(3, seed=4), "w": prompts(3, seed=5)}


@pytest.fixture(scope="module")
def want(default_model_dir, loaded) -> dict[str, list[int]]:
    """Every request's greedy tokens from a plain disaggregated run (no flips)."""
    cl = Cluster(default_model_dir, roles=("prefill", "decode"), loaded=loaded)
    for tag, batch in BATCHES.items():
        for i, p in enumerate(batch):
            cl.submit(f"{tag}{i}", p, max_tokens=MAX_TOKENS)
    cl.run()
    return dict(cl.tokens)


def finish(cl: Cluster) -> None:
    """Run until every request ended and no flip is under way (the supervisor's ticks included)."""
    plan = cl.front.flip_plan
    for _ in range(400):
        cl.flip_tick()
        cl.round()
        if not cl.front.reqs and not any(n.has_work() for n in cl.nodes.values()) \
                and all(plan.state_of(w) == "active" for w in cl.nodes):
            break
    cl.run()
    assert not cl.front.reqs and not cl.failed
    assert all(used == 0 for used in cl.blocks_used().values()), cl.blocks_used()


def test_in_place_flips_to_mixed_and_a_drain_back_lose_nothing(default_model_dir, loaded, want):
    batch = BATCHES["r"]
    policy = Scripted()
    cl = Cluster(default_model_dir, roles=("prefill", "prefill", "decode"), loaded=loaded, flip=policy)
    for i, p in enumerate(batch[:4]):
        cl.submit(f"r{i}", p, max_tokens=MAX_TOKENS)
    cl.round()  # worker 0 now holds a chunk running or queued, more in the front's packer
    assert cl.nodes[0].core.has_work() or cl.front.packers[0].queued_tokens
    policy.queue.append(FlipDecision(0, "prefill", "mixed", "prefill starved (test)"))
    cl.flip_tick()  # in place: SetRole goes out at once
    cl.round()
    assert cl.nodes[0].role == "mixed" and "prefill" in cl.nodes[0].side  # the old core runs on
    cl.flip_tick()  # the board shows mixed: dispatch to it resumes
    assert cl.front.flip_plan.state_of(0) == "active"
    for _ in range(3):
        cl.round()
    policy.queue.append(FlipDecision(2, "decode", "mixed", "prefill starved (test)"))
    cl.flip_tick()
    cl.round()
    assert cl.nodes[2].role == "mixed"
    cl.flip_tick()
    for i, p in enumerate(batch[4:], start=4):  # no decode worker left: worker 1's handoffs go to mixed ones
        cl.submit(f"r{i}", p, max_tokens=MAX_TOKENS)
    finish(cl)
    assert not cl.nodes[0].side.get("prefill") and not cl.nodes[2].side.get("prefill")
    assert cl.tokens == {k: v for k, v in want.items() if k[0] == "r"}  # greedy tokens as without flips
    assert ("Handoff", "mixed") in {(kind, role) for _, role, kind in cl.sent}  # a mixed worker took handoffs
    # a flip out of mixed (in place in auto mode): worker 0 back to prefill
    policy.queue.append(FlipDecision(0, "mixed", "prefill", "decode starved (test)"))
    for i, p in enumerate(BATCHES["s"]):
        cl.submit(f"s{i}", p, max_tokens=MAX_TOKENS)
    finish(cl)
    assert cl.nodes[0].role == "prefill" and not cl.nodes[0].side
    assert cl.tokens == {k: v for k, v in want.items() if k[0] in "rs"}
    assert ("SubmitMixed", "mixed") in {(kind, role) for _, role, kind in cl.sent}  # mixed ones take prompts too
    assert [d.to_role for _, d in cl.front.role_decisions] == ["mixed", "mixed", "prefill"]


def test_mixed_worker_takes_handoffs_and_an_abort_mid_flip(default_model_dir, loaded, want):
    batch = BATCHES["t"]
    policy = Scripted()
    cl = Cluster(default_model_dir, roles=("prefill", "decode", "decode"), loaded=loaded, flip=policy)
    for i, p in enumerate(batch[:3]):
        cl.submit(f"t{i}", p, max_tokens=MAX_TOKENS)
    for _ in range(3):
        cl.round()
    running = {w: cl.nodes[w].core.has_work() for w in (1, 2)}
    assert any(running.values())
    wid = 1 if running[1] else 2
    policy.queue.append(FlipDecision(wid, "decode", "mixed", "prefill starved (test)"))
    cl.flip_tick()
    cl.round()
    assert cl.nodes[wid].role == "mixed" and "decode" in cl.nodes[wid].side  # its decodes run on
    cl.abort("t2")  # an abort while the old core still runs: every core hears it
    for i, p in enumerate(batch[3:], start=3):  # the mixed worker now takes prompts and handoffs
        cl.submit(f"t{i}", p, max_tokens=MAX_TOKENS)
    finish(cl)
    assert "t2" not in cl.finished
    assert {k: v for k, v in cl.tokens.items() if k != "t2"} == {k: v for k, v in want.items() if k[0] == "t" and k != "t2"}
    assert "decode" in cl.nodes[wid].side  # a mixed worker keeps its handoff core (empty now)


def holds_prompts_and_decodes(node) -> bool:
    core = node.core
    return bool(core.running) and len(core.packer) > 0


def test_in_place_flips_out_of_mixed_keep_the_work_they_hold(default_model_dir, loaded, want):
    """Two mixed workers split into prefill + decode in place (issue 19's two-worker path):
    mixed -> prefill while the worker decodes and has prompts queued (its old mixed core
    finishes them, its new prefill core takes new prompts and hands them off), then the other
    mixed -> decode while it holds both too (it takes no prompt from then on, finishes its own,
    and takes the handoffs); an abort of a request the old core holds, mid-flip."""
    policy = Scripted()
    cl = Cluster(default_model_dir, roles=("mixed", "mixed"), loaded=loaded, flip=policy)
    for i, p in enumerate(BATCHES["u"]):
        cl.submit(f"u{i}", p, max_tokens=MAX_TOKENS)
    for _ in range(20):  # until worker 0 decodes with a prompt still queued behind (16-token chunks)
        if holds_prompts_and_decodes(cl.nodes[0]):
            break
        cl.round()
    assert holds_prompts_and_decodes(cl.nodes[0])
    held = {r for r in cl.nodes[0].core.requests}
    policy.queue.append(FlipDecision(0, "mixed", "prefill", "split (test)"))
    cl.flip_tick()
    assert cl.front.flip_plan.can_dispatch(0)  # in place: no drain, dispatch goes on in the new role
    cl.round()
    node0 = cl.nodes[0]
    assert node0.role == "prefill" and "mixed" in node0.side and node0.side["mixed"].has_work()
    victim = sorted(held)[-1]
    cl.abort(victim)  # an abort of what the old mixed core holds, mid-flip
    for i, p in enumerate(BATCHES["v"]):  # prompts: to the prefill worker (handed off) or the mixed one
        cl.submit(f"v{i}", p, max_tokens=MAX_TOKENS)
    for _ in range(20):
        if holds_prompts_and_decodes(cl.nodes[1]):
            break
        cl.round()
    assert holds_prompts_and_decodes(cl.nodes[1])
    policy.queue.append(FlipDecision(1, "mixed", "decode", "split (test)"))
    cl.flip_tick()
    cl.round()
    node1 = cl.nodes[1]
    assert node1.role == "decode" and node1.side["mixed"].has_work()  # its prompts and decodes run on
    before = len(cl.sent)
    for i, p in enumerate(BATCHES["w"]):  # now every prompt goes to worker 0, every handoff to 1
        cl.submit(f"w{i}", p, max_tokens=MAX_TOKENS)
    finish(cl)
    sent = {(wid, kind) for wid, _, kind in cl.sent[before:]}
    assert (1, "SubmitMixed") not in sent and (1, "ChunkPlan") not in sent and (1, "Handoff") in sent
    assert (0, "SubmitMixed") not in sent and (0, "ChunkPlan") in sent
    assert not node0.side.get("mixed") and not node1.side  # the old cores went once empty
    assert victim not in cl.finished
    assert cl.tokens == {k: v for k, v in want.items() if k[0] in "uvw" and k != victim}  # as without flips
    assert [(d.worker_id, d.to_role) for _, d in cl.front.role_decisions] == [(0, "prefill"), (1, "decode")]
    assert {w: n.role for w, n in cl.nodes.items()} == {0: "prefill", 1: "decode"}

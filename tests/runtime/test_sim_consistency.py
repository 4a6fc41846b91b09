"""The simulator makes the server's decisions: one workload through the in-process real
cluster (real model, real nodes, the real front) and through the simulator with the cost
model of that cluster's clock (every step one tick: `tests/runtime/inproc.py` advances its
clock 0.01 s a step; the KV copy is instant), checking the same level-1 worker per request
(two prefill workers) and the same admission order on the decode worker. (Level 2 over two
decode workers does not match yet: a simulated decode worker's board shows the handoffs it
admits from the start of the step that admits them, the real node's from the step's end.)

Both sides are event-ordered, with no timing dependence: every request arrives at t = 0, in
order; the in-process side delivers each message as soon as it is sent (the simulator's
delivery), and hands each step's output to the front before the next worker steps."""

from __future__ import annotations

import json
from collections import defaultdict
import random
from dataclasses import replace
from pathlib import Path

from tests.runtime.inproc import Cluster
from tetri.protocol import Handoff, KVCopied
from tetri.sim.cluster import Cluster as SimCluster
from tetri.sim.config import SimConfig
from tetri.sim.costmodel import CostModel, HardwareSpec, ModelSpec
from tetri.sim.requests import make_sim_request
from tetri.sim.workers import EventLoop

ROLES = ("prefill", "prefill", "decode")
CHUNK = 32
BLOCKS = 64
WORKLOAD = [(70, 9), (18, 4), (120, 12), (45, 7), (33, 10), (90, 5), (12, 11), (64, 8), (150, 6), (27, 12),
            (101, 3), (55, 9)]
"""(prompt tokens, output tokens): prompts of distinct block counts, outputs below a block."""
TICK_S = 0.01


def _real(model_dir: str, loaded, roles=ROLES) -> tuple[dict, dict, dict]:
    """The real cluster on the simulator's event loop: a step starts when a worker has work
    and is idle, and its output reaches the front one tick later (inproc's 0.01 s)."""
    c = Cluster(model_dir, roles=roles, num_blocks=BLOCKS, chunk_size=CHUNK, prefix_caching=False, loaded=loaded)
    loop, busy, touched, handed = EventLoop(), set(), [], {}
    level1, level2 = {}, {}
    admitted: dict[int, list[str]] = defaultdict(list)
    apply = c.apply

    def recording_apply(acts):
        for wid, m in acts.sends:
            if isinstance(m, Handoff):
                level2[m.req_id] = wid
                handed[wid] = handed.get(wid, 0) + 1
        touched.extend(wid for wid, _ in acts.sends)
        apply(acts)
    c.apply = recording_apply

    live_loads, shown = c.loads, {}
    # a step's chunk leaves the queue as it starts, a handoff waits as it arrives; everything
    # else a step does shows at its end (the simulator's worker)
    c.loads = lambda: [replace(shown[w.worker_id], queued_prefill_tokens=w.queued_prefill_tokens,
                               waiting_reqs=shown[w.worker_id].waiting_reqs + handed.get(w.worker_id, 0))
                       if w.worker_id in shown else w for w in live_loads()]

    def kick(wid):
        if wid in busy or not c.nodes[wid].has_work():
            return
        before = next(w for w in live_loads() if w.worker_id == wid)
        outs = c.nodes[wid].step(loop.now)
        if outs:
            busy.add(wid)
            shown[wid], handed[wid] = before, 0
            loop.at(loop.now + TICK_S, end, wid, outs)

    def deliver_and_kick():
        for wid in c.nodes:
            c.deliver(wid)
        kicks = list(dict.fromkeys(touched))
        touched.clear()
        for wid in kicks:
            kick(wid)

    def end(wid, outs):
        busy.discard(wid)
        shown.pop(wid)
        c.now = loop.now
        for msg in outs:
            if isinstance(msg, KVCopied):
                admitted[msg.worker_id].append(msg.req_id)
            c.to_front.append(msg)
            c.pump_front()
            deliver_and_kick()
        c.check()
        kick(wid)

    def arrive(i, prompt, output):
        c.submit(f"r{i}", [5 + (i * 7 + k) % 400 for k in range(prompt)], max_tokens=output)
        level1[f"r{i}"] = c.front.reqs[f"r{i}"].prefill_worker
        deliver_and_kick()

    for i, (prompt, output) in enumerate(WORKLOAD):
        loop.at(0.0, arrive, i, prompt, output)
    assert loop.run(until_s=60.0)
    assert sorted(c.finished) == sorted(level1) and not c.failed
    return level1, level2, admitted


def _sim(model_dir: str, roles=ROLES) -> tuple[dict, dict, dict]:
    cfg_json = json.loads((Path(model_dir) / "config.json").read_text())
    model = ModelSpec.from_hf_config("test", cfg_json)
    tick = HardwareSpec("inproc-tick", peak_flops=1e30, hbm_bytes_s=1e30, memory_bytes=1e12, link_bytes_s=1e30,
                        host_link_bytes_s=1e30, link_latency_s=0.0, prefill_overhead_s=0.0, decode_overhead_s=0.0,
                        step_latency_s=TICK_S)
    cfg = SimConfig(mode="tetri", num_gpus=len(roles), num_prefill=roles.count("prefill"), chunk_size_tokens=CHUNK, num_blocks=BLOCKS,
                    decode_dispatch="least-loaded", decode_policy="greedy", predictor="none").resolved()
    loop = EventLoop()
    sim = SimCluster(cfg, CostModel(model, tick), loop, random.Random(0))
    admitted: dict[int, list[str]] = defaultdict(list)
    copied = sim.kv_copied

    def recording_copied(msg):
        admitted[msg.worker_id].append(msg.req_id)
        copied(msg)
    sim.kv_copied = recording_copied
    reqs = [make_sim_request(i, p, o, 0.0, model.max_model_len) for i, (p, o) in enumerate(WORKLOAD)]
    for req in reqs:
        loop.at(0.0, sim.arrive, req)
    assert loop.run()
    assert all(r.done_s is not None for r in reqs)
    return ({r.req_id: r.prefill_worker for r in reqs}, {r.req_id: r.decode_worker for r in reqs}, admitted)


def test_the_simulator_dispatches_and_admits_as_the_real_cluster(default_model_dir, loaded):
    real1, real2, real_admitted = _real(default_model_dir, loaded)
    sim1, sim2, sim_admitted = _sim(default_model_dir)
    assert len(set(real1.values())) == 2 and len(real_admitted[2]) == len(WORKLOAD)  # level 1 really chose
    assert sim1 == real1
    assert sim2 == real2
    assert sim_admitted == real_admitted

"""A step longer than the heartbeat timeout does not get a healthy worker killed (issue 20,
item 3): the real engine client and worker processes, with the decode workers' first step
made to last longer than the supervisor's heartbeat timeout. The heartbeat comes from a
thread, so the supervisor sees a live worker; nothing is timed against the machine."""

import asyncio

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.launch import LaunchConfig, WorkerSpec
from tetri.sched.front import FrontConfig
from tetri.server.engine_api import EngineRequest
from tetri.server.engine_client import RuntimeClient
from tetri.types import SamplingParams

HEARTBEAT_TIMEOUT_S = 1.5
SLOW_STEP_S = 4.0


def slow_first_step_worker_main(args) -> None:
    """Spawn target (imported by name in the child): a real worker whose first decode step
    sleeps SLOW_STEP_S, as a large model's step on a CPU would take that long."""
    import time

    from tetri.workers import node
    from tetri.workers.proc import worker_main

    real_step = node.WorkerNode.step
    slept = []

    def step(self, now):
        if self.role == "decode" and not slept:
            slept.append(True)
            time.sleep(SLOW_STEP_S)
        return real_step(self, now)

    node.WorkerNode.step = step
    worker_main(args)


async def test_a_step_longer_than_the_heartbeat_timeout_keeps_its_worker(default_model_dir, monkeypatch):
    from tetri import LLM

    monkeypatch.setattr("tetri.launch.worker_main", slow_first_step_worker_main)
    launch = LaunchConfig(workers=(WorkerSpec("prefill"), WorkerSpec("decode")),
                          heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    client = RuntimeClient(ModelConfig(model=default_model_dir), CacheConfig(num_blocks=64),
                           EngineSchedConfig(chunk_size=16), FrontConfig(chunk_size=16), launch)
    await client.start()
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        stream = client.submit(EngineRequest(req_id="r", prompt_token_ids=[5, 6, 7, 8], params=params))
        tokens, errors = [], []
        async for out in stream:
            errors.append(out.error)
            tokens += [t for ch in out.choices for t in ch.token_ids]
        assert [e for e in errors if e] == []
        assert client.dead == set() and client.procs.restarts == {}  # nobody was declared dead
        assert client.scheduler.migrated_total == 0
        await asyncio.sleep(HEARTBEAT_TIMEOUT_S + 0.5)  # and an idle worker keeps beating too
        assert client.dead == set()
    finally:
        await client.close()
    assert tokens == LLM(default_model_dir).generate([[5, 6, 7, 8]], params)[0].token_ids

"""Chaos: workers SIGKILLed under a bounded streaming load (tools/chaos.py, its own server),
and a scheduler-level repro of a leak such a run can hit by timing."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from tests.reliability.helpers import load_tool
from tetri.protocol import ChunkDone, Handoff, PrefillResult, Release
from tetri.sched.front import FrontConfig, FrontReq, FrontScheduler, ReqState
from tetri.sched.load import WorkerLoad
from tetri.types import SamplingParams


@pytest.mark.slow
def test_chaos_kills_under_load_keep_every_invariant(default_model_dir):
    """72 streams in 3 waves over 12 s, the busiest decode worker SIGKILLed after 30% were
    started and the prefill worker after 60%. Every n=1 request on a killed worker migrates, so
    none errors: each either completes with the offline engine's tokens or was hung up on by
    its client. The request deadline grows with the measured start-up time (a restart reloads
    the model), so a slow machine is not mistaken for a hang."""
    chaos = load_tool("chaos")
    rep = chaos.main(["--requests", "72", "--concurrency", "24", "--duration-s", "12",
                      "--request-deadline-s", "60", "--deadline-per-startup", "4", "--drain-timeout-s", "60"])
    brief = {k: v for k, v in rep.items() if k not in ("workers_at_end", "server_args")}
    print(json.dumps(brief))
    assert rep["hung"] == 0, brief
    assert rep["completed"] + rep["errored"] + rep["cancelled"] == rep["sent"] == 72, brief
    assert sorted(k["role"] for k in rep["kills"] if k.get("killed")) == ["decode", "prefill"], brief
    assert rep["migrated"] >= 1, brief
    assert rep["restarts"] >= 2, brief
    assert rep["leaked_blocks"] == 0 and rep["kv_usage_after"] == 0 and rep["num_running_after"] == 0, brief
    assert rep["mismatches"] == 0 and rep["prefix_mismatches"] == 0, brief
    assert rep["healthy_at_end"] and rep["post_restart_request_ok"], brief
    assert rep["errored"] == 0, brief  # migration: no request is lost to a kill
    assert rep["cancelled"] <= rep["disconnects_planned"], brief  # only clients that hung up on purpose
    assert rep["server_exit_code"] == 0, brief
    assert rep["ok"], brief


def _loads(dead: int | None = None) -> list[WorkerLoad]:
    rows = [WorkerLoad(0, "prefill", free_blocks=64, total_blocks=64),
            WorkerLoad(1, "decode", free_blocks=64, total_blocks=64),
            WorkerLoad(2, "decode", free_blocks=64, total_blocks=64)]
    return [replace(w, state="dead") if w.worker_id == dead else w for w in rows]


def test_decode_death_while_its_abort_is_pending_releases_the_prefill_copy():
    fs = FrontScheduler(FrontConfig(chunk_size=64), random.Random(0))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    acts = fs.add(FrontReq("r", [5, 6, 7, 8], params, 0.0), _loads(), 0.0)
    (wid, plan), = acts.sends
    assert wid == 0
    done = ChunkDone(worker_id=0, chunk_id=plan.chunk_id, finished=[PrefillResult(
        req_id="r", block_ids=[0], num_prompt_tokens=4, first_tokens=[42], finish_reasons=[None])])
    acts = fs.on_chunk_done(done, _loads(), 0.0)
    (did, handoff), = acts.sends
    assert isinstance(handoff, Handoff) and fs.reqs["r"].state is ReqState.AWAIT_DECODE
    fs.abort("r")  # the client hung up: Abort to the decode worker, prefill copy kept until Dropped
    assert "r" in fs.reqs and fs.reqs["r"].aborting
    acts = fs.on_worker_dead(did, _loads(dead=did), migrate=True)  # ... which dies before answering
    acts.extend(fs.expire(1e9))
    assert "r" not in fs.reqs, "the request never leaves the front scheduler"
    assert (0, Release(req_id="r")) in acts.sends, "the prefill worker is never told to free the request's blocks"

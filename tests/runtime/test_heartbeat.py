"""A step longer than the heartbeat timeout does not get a healthy worker killed (issue 20,
item 3): the heartbeat comes from a thread, so the board row keeps beating while a step runs.

The real worker shell (its ZeroMQ sockets, load board, model and pool) runs in a thread of
this process, with its first step held until the board shows a beat written after the step
began. The old shell wrote the row only between steps, so that beat never came (the step
gives up after STEP_LIMIT_S and the test fails). Nothing is timed against the machine: the
test only orders a beat after the step's start. The supervisor's stale-row detection itself
is tested in test_faults.py (a SIGSTOPped worker, whose heartbeat thread stops too)."""

import os
import threading
import time

import zmq

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.control.load_board import LoadBoard
from tetri.protocol import Shutdown, encode
from tetri.workers.proc import WorkerArgs, WorkerShell

STEP_LIMIT_S = 30.0


def test_the_board_row_beats_while_a_step_runs(default_model_dir, tmp_path):
    board = LoadBoard.create(1)
    zctx = zmq.Context()
    front = zctx.socket(zmq.PULL)
    front.bind(f"ipc://{tmp_path}/front.sock")
    args = WorkerArgs(worker_id=0, role="decode", model=ModelConfig(model=default_model_dir),
                      cache=CacheConfig(num_blocks=8), sched=EngineSchedConfig(chunk_size=16), ipc_dir=str(tmp_path),
                      board_name=board.name, num_workers=1, parent_pid=os.getppid())
    shell = WorkerShell(args)
    node, seen = shell.node, {}

    def long_step(now):
        """The first step: wait (up to STEP_LIMIT_S) for a beat written after it began."""
        node.has_work = node.can_step = lambda: False  # one long step, then idle
        began = time.monotonic()
        while time.monotonic() - began < STEP_LIMIT_S and board.read(0).heartbeat_s <= began:
            time.sleep(0.02)
        seen["beat_after_start"] = board.read(0).heartbeat_s > began
        seen["state"] = board.read(0).state
        return []

    node.has_work = node.can_step = lambda: True
    node.step = long_step
    runner = threading.Thread(target=shell.run, daemon=True)
    runner.start()
    push = zctx.socket(zmq.PUSH)
    try:
        assert front.poll(60_000), "the worker never sent Ready"
        front.recv()
        deadline = time.monotonic() + STEP_LIMIT_S + 30
        while "state" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        push.connect(args.endpoint)
        push.send(encode(Shutdown()))
        runner.join(30)
        assert not runner.is_alive(), "the worker shell did not stop on Shutdown"
    finally:
        shell.close()
        push.close(linger=0)
        front.close(linger=0)
        zctx.term()
        board.close()
    assert seen == {"beat_after_start": True, "state": "ready"}

"""`--enforce-eager` (vLLM's flag) reaches the worker: cli -> ModelConfig -> engine client ->
the spawned worker's arguments (the executor then skips graph capture: tests/engine/test_cuda.py
checks that on a GPU)."""

from __future__ import annotations

import pytest

from tetri.cli import build_engine, build_parser
from tetri.config import EngineSchedConfig, ModelConfig
from tetri.launch import LaunchConfig, WorkerProcs, WorkerSpec


class _Spawned:
    """Stands in for the spawn context: records the worker's arguments, starts nothing."""

    def __init__(self) -> None:
        self.args = []

    def Process(self, target, args, name, daemon):  # noqa: N802 (multiprocessing's name)
        self.args.append(args[0])
        return self

    def start(self) -> None:
        pass


@pytest.mark.parametrize("flag, expected", [([], False), (["--enforce-eager"], True)])
def test_the_flag_reaches_the_workers_arguments(default_model_dir, flag, expected, tmp_path):
    args = build_parser().parse_args(["--model", default_model_dir, *flag])
    client = build_engine(args)
    assert client.model_cfg.enforce_eager is expected
    procs = WorkerProcs(client.model_cfg, client.cache_cfg, client.sched_cfg,
                        LaunchConfig(workers=(WorkerSpec("mixed", "cuda:1"),)), board_name="unused",
                        ipc_dir=str(tmp_path))
    procs._ctx = _Spawned()
    procs.spawn(0)
    worker = procs._ctx.args[0]
    assert worker.model.enforce_eager is expected and worker.model.device == "cuda:1"
    assert worker.sched == EngineSchedConfig(max_num_seqs=256)


def test_an_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(attention="flash")

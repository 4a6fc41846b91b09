"""Fixtures of the reliability tests.

Starting `tetri-serve` costs 10-30 s on a small CPU machine, so every test here that only
needs a healthy 1-prefill + 1-decode server shares ONE (package scope, `shared_server`,
started with the flags the overload and shutdown tests need). Tests that kill or poison a
process start their own (tools/chaos.py) or work in-process. The graceful-shutdown tests end
that shared server, so they are marked `run_last` and moved behind every other test of this
package (the order of tests outside tests/reliability is left alone).
"""

from __future__ import annotations

import pytest

from tests.runtime.server_proc import ServerProc

SHARED_ARGS = ("--device", "cpu", "--prefill", "1", "--decode", "1", "--max-queue", "8", "--shutdown-timeout", "3",
               "--heartbeat-timeout-s", "120")  # the overload test SIGSTOPs the decode worker for a moment


def pytest_configure(config):
    config.addinivalue_line("markers", "run_last: run after every other test of tests/reliability")


def pytest_collection_modifyitems(session, config, items):
    mine = [i for i, item in enumerate(items) if "tests/reliability/" in item.nodeid.replace("\\", "/")]
    ordered = sorted((items[i] for i in mine), key=lambda it: it.get_closest_marker("run_last") is not None)
    for pos, item in zip(mine, ordered):
        items[pos] = item


@pytest.fixture(scope="package")
def shared_server(default_model_dir):
    srv = ServerProc(*SHARED_ARGS).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="package")
def offline(default_model_dir):
    """The offline engine on the same model: the reference greedy outputs."""
    from tetri import LLM

    llm = LLM(default_model_dir)
    yield llm
    llm.close()


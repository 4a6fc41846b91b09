"""The front process stays light: resolving the model (the embedded one, a GGUF file) and
serving requests import no torch; only worker processes load the model stack."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r'''
import asyncio, sys
from tetri.cli import build_engine, build_parser
from tetri.config import ServerConfig
from tetri.server.app import create_app, start_app
from tetri.server.fake_engine import FakeEngineClient
from tetri.workers.models.source import resolve_model_dir

engine = build_engine(build_parser().parse_args(sys.argv[2:]))  # the real client, resolving the model, not started
assert engine.model_dir == resolve_model_dir(sys.argv[1] or None)

async def main():
    import aiohttp
    runner, port = await start_app(create_app(ServerConfig(port=0), FakeEngineClient(engine.model_dir)))
    async with aiohttp.ClientSession() as s:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True}
        async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
        async with s.post(f"http://127.0.0.1:{port}/tokenize", json={"prompt": "hi"}) as r:
            assert r.status == 200
    await runner.cleanup()

asyncio.run(main())
print("torch" in sys.modules, "transformers.modeling_utils" in sys.modules)
'''


def run_front(model: str = "", *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, model, *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_front_with_the_default_model_imports_no_torch(default_model_dir):
    assert run_front() == "False False"


def test_front_in_auto_mode_plans_its_start_without_torch(default_model_dir):
    """--mode auto runs tetri-plan (the simulator) in the front process at start: still no torch."""
    assert run_front("", "--mode", "auto", "--workers", "2", "--plan-flags",
                     "--num-requests 30 --max-requests 90 --window-s 2 --max-sims 4") == "False False"

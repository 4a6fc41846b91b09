"""House rule: tetri/sched is pure policy code (no torch/zmq/asyncio/aiohttp/numpy, no clock)."""

import pathlib
import re
import subprocess
import sys

SCHED_DIR = pathlib.Path(__file__).resolve().parents[2] / "tetri" / "sched"
BLOCKED = ("torch", "zmq", "asyncio", "aiohttp", "numpy")


def test_every_sched_module_imports_without_heavy_deps():
    modules = sorted(p.stem for p in SCHED_DIR.glob("*.py"))
    assert {"dispatch", "decode_policy", "flip", "predictor", "mlfq", "predictor_cli"} <= set(modules)
    code = "\n".join([
        "import importlib, sys",
        *[f"sys.modules[{m!r}] = None" for m in BLOCKED],
        f"for name in {modules!r}:",
        "    importlib.import_module('tetri.sched.' + name)",
        f"assert not any(sys.modules.get(m) for m in {BLOCKED!r})",
        "print('ok', len(" + repr(modules) + "))",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=SCHED_DIR.parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


CLOCK = re.compile(r"^\s*(import time|from time import|import datetime|from datetime import)"
                   r"|time\.(time|monotonic|perf_counter)\(|random\.(random|choice|randint|shuffle|sample|uniform)\(",
                   re.M)


def test_no_clock_reads_or_global_randomness():
    for path in SCHED_DIR.glob("*.py"):
        hit = CLOCK.search(path.read_text())
        assert hit is None, f"{path.name}: {hit.group(0)!r}"

"""The engine client only feeds events in and carries actions out: in the front process's
modules (tetri/server/) and the in-process cluster (tests/runtime/inproc.py), every call on
the front scheduler is one of its event methods (or a read), and nothing assigns into it.
A grep-style AST check, like tests/test_import_cycles.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "tetri" / "server").glob("*.py")) + [ROOT / "tests" / "runtime" / "inproc.py"]
EVENTS = {"add", "on_chunk_done", "chunk_done", "prefilled", "on_token_batch", "on_kv_copied", "on_dropped",
          "abort", "expire", "unpark", "on_worker_dead", "fail_request", "flip_tick"}
READS = {"predict_inputs", "reqs", "parked", "parked_handoffs", "migrated_total", "predictor", "flip_policy",
         "flip_plan", "cfg"}
READ_CALLS = {"get", "items", "values", "keys"}
FLIP_MEMBERSHIP = {("flip_plan", "add_worker")}
"""A restarted worker rejoins the flip plan (supervisor.on_ready): the roles' bookkeeping,
not a request's state (the flip code is another area's; left as it is)."""


def _is_scheduler(node: ast.AST) -> bool:
    """`<x>.scheduler` (the engine client's) or `self.front` (the in-process cluster's)."""
    return isinstance(node, ast.Attribute) and (
        node.attr == "scheduler" or (node.attr == "front" and isinstance(node.value, ast.Name) and node.value.id == "self"))


def scheduler_uses(path: Path) -> list[str]:
    """Every use of the scheduler in `path` that is neither an event, a read nor a read's
    read-only call, as 'line: what'."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_scheduler(node.value)):
            continue
        name, up = node.attr, parents.get(node)
        called = isinstance(up, ast.Call) and up.func is node
        if called and name not in EVENTS and name not in READS:
            bad.append(f"{node.lineno}: calls scheduler.{name}")
        elif not called and name not in EVENTS | READS:
            bad.append(f"{node.lineno}: reads scheduler.{name}")
        elif isinstance(up, ast.Attribute) and isinstance(parents.get(up), ast.Call) and parents[up].func is up \
                and up.attr not in READ_CALLS and (name, up.attr) not in FLIP_MEMBERSHIP:
            bad.append(f"{node.lineno}: calls scheduler.{name}.{up.attr}")
        if isinstance(getattr(node, "ctx", None), (ast.Store, ast.Del)) or \
                (isinstance(up, ast.Subscript) and isinstance(up.ctx, (ast.Store, ast.Del))):
            bad.append(f"{node.lineno}: assigns into scheduler.{name}")
    return sorted(bad, key=lambda b: int(b.split(":")[0]))


def test_the_engine_client_calls_only_the_schedulers_event_methods():
    found = {p.relative_to(ROOT).as_posix(): scheduler_uses(p) for p in FILES}
    assert {p: b for p, b in found.items() if b} == {}
    used = sum(len([n for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Attribute) and _is_scheduler(n)])
               for p in FILES)
    assert used > 20  # the check sees the calls (the engine client, worker_messages, supervisor, inproc)


def test_the_check_catches_a_state_changing_call(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f(client, msg):\n"
                   "    client.scheduler.on_token_batch(msg)\n"
                   "    client.scheduler.record_output('a', 0, [1])\n"
                   "    client.scheduler.reqs.pop('a')\n"
                   "    client.scheduler.reqs['a'] = None\n"
                   "    self.front.owns('a', 1, decoding=True)\n")
    assert scheduler_uses(src) == ["3: calls scheduler.record_output", "4: calls scheduler.reqs.pop",
                                   "5: assigns into scheduler.reqs", "6: calls scheduler.owns"]

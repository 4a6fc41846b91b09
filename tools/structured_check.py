"""The twenty json_schema prompts (tests/runtime/structured_cases.py) against `tetri-serve` with the
real default model, in both modes, each streamed and not (80 answers), every answer parsed and
validated with jsonschema. The suite asks each prompt once (the even ones disaggregated, the odd
ones colocated, half of each streamed: tests/runtime/test_real_structured.py, to keep the suite's
time down); this asks all of them in both modes, streamed and not.

    python tools/structured_check.py                 # starts a server per mode (SmolLM2 default)
    python tools/structured_check.py --max-tokens 200
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.runtime.server_proc import ServerProc  # noqa: E402
from tests.runtime.structured_cases import CASES  # noqa: E402


def answer(client, model: str, i: int, stream: bool, max_tokens: int) -> tuple[str, str | None]:
    question, schema = CASES[i]
    kw = dict(model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.0,
              response_format={"type": "json_schema", "json_schema": {"name": f"case_{i}", "schema": schema, "strict": True}})
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    return "".join(text), finish


def check_mode(mode: str, max_tokens: int) -> tuple[int, int, list[str]]:
    import jsonschema

    args = ["--device", "cpu"] + (["--mode", "colocated", "--workers", "1"] if mode == "colocated" else [])
    os.environ.pop("TETRI_DEFAULT_MODEL", None)
    srv = ServerProc(*args, ready_timeout_s=900).start()
    try:
        client = srv.openai(timeout=900)
        model = client.models.list().data[0].id
        jobs = [(i, stream) for i in range(len(CASES)) for stream in (False, True)]
        start = time.monotonic()
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: answer(client, model, job[0], job[1], max_tokens), jobs))
        seconds = time.monotonic() - start
        failures = []
        for (i, stream), (text, finish) in zip(jobs, answers):
            try:
                if finish != "stop":
                    raise ValueError(f"finish_reason {finish}")
                jsonschema.validate(json.loads(text), CASES[i][1])
            except (ValueError, jsonschema.ValidationError) as exc:
                failures.append(f"{mode} case {i} ({'stream' if stream else 'full'}): {exc}: {text!r}")
        print(f"{mode}: {len(jobs) - len(failures)}/{len(jobs)} answers parse and validate "
              f"({len(CASES)} prompts x streamed and not, {seconds:.1f} s)", flush=True)
        return len(jobs) - len(failures), len(jobs), failures
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--modes", nargs="+", default=["disagg", "colocated"], choices=["disagg", "colocated"])
    args = ap.parse_args(argv)
    bad = []
    for mode in args.modes:
        bad += check_mode(mode, args.max_tokens)[2]
    for line in bad:
        print("FAILED", line)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A constrained stream survives its decode worker's death: SIGKILL a decode worker of a real
`tetri-serve` (1 prefill + 2 decode, the embedded model) mid-stream; the request migrates, the
continuation's grammar resumes after the tokens already streamed, and the client's output still
validates against its schema, token for token what the offline engine answers undisturbed."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import jsonschema

from tests.runtime.server_proc import ServerProc

ITEMS = {"type": "array", "items": {"enum": ["alpha", "beta", "gamma", "delta"]}, "minItems": 30, "maxItems": 30}
STRUCTURED = {"json": ITEMS, "disable_any_whitespace": True}


def test_sigkill_mid_stream_keeps_a_constrained_output_valid(default_model_dir):
    from tetri import LLM, SamplingParams
    from tetri.types import StructuredOutputsParams

    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2").start()
    try:
        client = srv.openai(timeout=180)
        model = client.models.list().data[0].id
        prompts = [[5, 6, 7, 8]]
        got: dict[int, list[int]] = {0: []}
        texts: dict[int, list[str]] = {0: []}

        def stream(i: int) -> str | None:
            finish = None
            for chunk in client.completions.create(model=model, prompt=prompts[i], max_tokens=1500, temperature=0.0,
                                                   stream=True, extra_body={"structured_outputs": STRUCTURED,
                                                                            "return_token_ids": True}):
                for ch in chunk.choices:
                    got[i].extend((ch.model_extra or {}).get("token_ids") or [])
                    texts[i].append(ch.text or "")
                    finish = ch.finish_reason or finish
            return finish

        with cf.ThreadPoolExecutor(1) as pool:
            futs = [pool.submit(stream, 0)]
            victim = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline:
                if len(got[0]) >= 20:  # the stream is under way
                    busy = [w for w in srv.workers() if w["role"] == "decode" and w["running"] > 0]
                    victim = busy[0] if busy else None
                time.sleep(0.02)
            assert victim is not None, "the stream never got going"
            os.kill(victim["pid"], signal.SIGKILL)
            finishes = [f.result(timeout=300) for f in futs]
        metrics = srv.get("/metrics")[1]
        migrated = next(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("tetri:requests_migrated_total"))
        assert migrated >= 1  # the kill came mid-stream: a request was resumed elsewhere
        assert finishes == ["stop"]
        jsonschema.validate(json.loads("".join(texts[0])), ITEMS)
        spec = StructuredOutputsParams(json=json.dumps(ITEMS), any_whitespace=False)
        want = LLM(default_model_dir).generate(prompts, SamplingParams(max_tokens=1500, temperature=0.0,
                                                                       structured_outputs=spec))
        assert got[0] == want[0].token_ids  # nothing duplicated, nothing missing
        assert srv.wait_idle(30)
    finally:
        srv.stop()
